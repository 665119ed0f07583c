"""Embeddings through the pipeline: what every dialect's embeddings route asks (an ``EmbeddingRequest``), and
the checks, admission and batching it passes on its way to an embedding model's engine thread.

An embeddings request is admitted like a generation that only counts its prompt (a job of max_tokens 0):
the caller's in-flight slot and the before_generate hooks (rate limits count its tokens), and
after_generate accounts for its input tokens once it ends, so every plugin sees it as it sees generations.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from dataclasses import dataclass
from typing import Any

from forgellm.core.api.admission import Admission
from forgellm.core.api.generation import request_timed_out
from forgellm.core.api.prompt import checked_ids
from forgellm.core.api.request import Caller
from forgellm.core.engine.backend import EmbeddingModel
from forgellm.core.engine.generation import GenerationJob, Usage
from forgellm.core.errors import ApiError, bad_request, service_unavailable
from forgellm.core.models.resident import Resident

MAX_INPUTS = 2048  # OpenAI's limit on the inputs of one request


@dataclass(frozen=True)
class EmbeddingRequest:
    """Inputs to embed, as text or as the model's token ids (taken as they are, special tokens included)."""

    inputs: list[str] | list[list[int]]
    model: str | None = None
    # Cut an input longer than the model's window to fit (its end tokens kept), instead of refusing it.
    truncate: bool = False
    dimensions: int | None = None  # the vectors' length the client expects


@dataclass(frozen=True)
class Embeddings:
    vectors: list[list[float]]
    prompt_tokens: int  # over every input, as embedded (after truncation)
    model_name: str  # the name it is served as


def check_inputs(request: EmbeddingRequest) -> None:
    """What can be refused before a model is chosen: no inputs, too many, or an empty one."""
    if not request.inputs:
        raise bad_request("input: at least one input is required")
    if len(request.inputs) > MAX_INPUTS:
        raise bad_request(f"input: at most {MAX_INPUTS} inputs are allowed; the request has {len(request.inputs)}")
    for index, item in enumerate(request.inputs):
        if len(item) == 0:
            raise bad_request(f"input[{index}] is empty")
    if request.dimensions is not None and request.dimensions < 1:
        raise bad_request("dimensions must be at least 1")


def check_dimensions(model: EmbeddingModel, asked: int | None) -> None:
    if asked is not None and asked != model.dimensions:
        raise bad_request(
            f"dimensions: {model.name} makes vectors of {model.dimensions} dimensions and cannot shorten them; "
            f"leave dimensions out or ask for {model.dimensions}"
        )


def encoded(model: EmbeddingModel, request: EmbeddingRequest, max_tokens: int) -> list[list[int]]:
    """Each input's tokens as the model embeds them, within its window (cut there when the request asks); more
    than the model's window, or than max_tokens in all, is a 400."""
    window = model.context_length
    inputs: list[list[int]] = []
    items: list[str | list[int]] = list(request.inputs)
    for index, item in enumerate(items):
        if isinstance(item, str):
            tokens = model.encode(item)
        else:
            tokens = checked_ids(item, model.vocab_size, f"input[{index}]")
        if window is not None and len(tokens) > window:
            if not request.truncate:
                raise bad_request(
                    f"input[{index}] is {len(tokens)} tokens; {model.name} embeds at most {window} "
                    "(send truncate: true to cut longer inputs to fit)"
                )
            tokens = model.truncated(tokens)
        inputs.append(tokens)
    total = sum(len(tokens) for tokens in inputs)
    if total > max_tokens:
        raise bad_request(f"The inputs are {total} tokens in all; the limit is {max_tokens} (--max-embedding-tokens)")
    return inputs


async def embedded(
    resident: Resident,
    model: EmbeddingModel,
    caller: Caller,
    request: EmbeddingRequest,
    admission: Admission,
    limits: tuple[int, float],
) -> Embeddings:
    """The request's vectors from the resident model (admitted, encoded, batched with other requests' inputs),
    accounted once; limits: (--max-embedding-tokens, --request-timeout, 0 for none)."""
    max_tokens, timeout = limits
    caller.record.model = resident.name
    check_dimensions(model, request.dimensions)
    texts = [item for item in request.inputs if isinstance(item, str)]
    job = GenerationJob(
        prompt_tokens=[],
        max_tokens=0,
        prompt_text="\n".join(texts),
        client=caller.client_key,
        embeds=len(request.inputs),
    )
    await admission.admit(caller, job)
    try:
        try:
            inputs = await asyncio.to_thread(encoded, model, request, max_tokens)
        except ValueError as exc:  # a token id out of the model's vocabulary
            raise bad_request(str(exc)) from None
        job.prompt_tokens = [token for tokens in inputs for token in tokens]
        caller.record.prompt_tokens = len(job.prompt_tokens)
        if resident.model is not model:
            raise service_unavailable("The model changed while the request was prepared; retry")
        vectors = await _answer(resident.scheduler.submit_embedding(inputs), caller, timeout)
    finally:
        await admission.settle(caller, job, Usage(len(job.prompt_tokens), 0))
    return Embeddings(vectors, len(job.prompt_tokens), resident.name)


async def _answer(
    future: concurrent.futures.Future[list[list[float]]], caller: Caller, timeout: float
) -> list[list[float]]:
    """The vectors, or a 499 when the caller leaves first (its inputs not yet embedded are dropped)."""
    vectors = asyncio.wrap_future(future)
    disconnected = asyncio.ensure_future(caller.disconnected())
    waited: set[asyncio.Future[Any]] = {vectors, disconnected}
    try:
        done, _ = await asyncio.wait(waited, timeout=timeout or None, return_when="FIRST_COMPLETED")
    finally:
        disconnected.cancel()
        if not vectors.done():
            vectors.cancel()
    if vectors not in done:
        if disconnected in done:
            raise ApiError(499, "Client closed the request")
        raise request_timed_out(timeout, "Embedding")
    exception = vectors.exception()
    if isinstance(exception, ApiError):
        raise exception
    if exception is not None:
        raise ApiError(500, f"Embedding failed: {exception}") from exception
    return vectors.result()
