"""``POST /v1/completions``: raw prompts (text or token ids) through the pipeline, continued as text."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence

from litestar.response import Stream

from forgellm.core.api.generation import Generation
from forgellm.core.api.openai.protocol import (
    COMPLETIONS_DEFAULT_MAX_TOKENS,
    MAX_CHOICES,
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    UsageBody,
)
from forgellm.core.api.openai.serving import choice_requests, include_usage, sse_events, usage_of
from forgellm.core.api.pipeline import GenerationService
from forgellm.core.api.request import Caller, GenerationRequest
from forgellm.core.engine.generation import Delta, TokenLogprob
from forgellm.core.errors import bad_request


async def serve_completion(
    data: CompletionRequest, caller: Caller, generations: GenerationService
) -> CompletionResponse | Stream:
    prompts, requests = completion_requests(data)
    started = await generations.start_group(caller, requests)
    response_id, created, asked = f"cmpl-{uuid.uuid4().hex}", int(time.time()), data.logprobs is not None
    model = started.model_name
    echoes = [str(prompt) if data.echo else "" for prompt in prompts for _ in range(data.n)]

    def chunk(choices: list[CompletionChunkChoice], usage: UsageBody | None = None) -> CompletionChunk:
        return CompletionChunk(response_id, "text_completion", created, model, choices, usage)

    if data.stream:

        def on_delta(index: int, delta: Delta, first: bool) -> list[CompletionChunk]:
            text = (echoes[index] if first else "") + delta.text
            return [chunk([CompletionChunkChoice(index, text, _logprobs(delta.logprobs, asked), None)])]

        def on_end(index: int, generation: Generation) -> list[CompletionChunk]:
            reason = generation.completion().finish_reason
            return [chunk([CompletionChunkChoice(index, "", None, reason)])]  # type: ignore[arg-type]

        usage = (lambda: chunk([], usage_of(started, len(prompts)))) if include_usage(data) else None
        return sse_events(started, on_delta, on_end, usage)
    await started.complete()
    return CompletionResponse(
        id=response_id,
        created=created,
        model=model,
        choices=[
            CompletionChoice(
                index,
                echoes[index] + generation.completion().text,
                generation.completion().finish_reason,  # type: ignore[arg-type]
                _logprobs(generation.logprobs, asked, len(echoes[index])),
            )
            for index, generation in enumerate(started)
        ],
        usage=usage_of(started, len(prompts)),
    )


def _completion_prompts(data: CompletionRequest) -> list[str | list[int]]:
    """OpenAI's four prompt forms: a string, strings, token ids, lists of token ids; one choice per prompt."""
    prompt = data.prompt
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise bad_request("prompt is empty")
    if all(isinstance(item, int) for item in prompt):
        return [[int(item) for item in prompt]]  # type: ignore[arg-type]  # one prompt, as token ids
    if all(isinstance(item, str) for item in prompt) or all(isinstance(item, list) for item in prompt):
        return list(prompt)  # type: ignore[arg-type]
    raise bad_request("prompt must be a string, a list of strings, a list of token ids or a list of such lists")


def completion_requests(data: CompletionRequest) -> tuple[list[str | list[int]], list[GenerationRequest]]:
    if data.suffix is not None:
        raise bad_request("suffix is not supported by this server")
    if data.role_mapping is not None:
        raise bad_request("role_mapping is not supported by this server: a completion's prompt is sent as it is")
    if data.best_of not in (None, 1):
        raise bad_request("best_of is not supported by this server (only 1)")
    prompts = _completion_prompts(data)
    if len(prompts) * data.n > MAX_CHOICES:
        raise bad_request(f"At most {MAX_CHOICES} choices (prompts times n) per request are supported")
    if data.echo and (data.logprobs is not None or any(not isinstance(p, str) for p in prompts)):
        raise bad_request("echo is supported for text prompts without logprobs")
    requests = []
    for prompt in prompts:
        base = GenerationRequest(
            prompt=prompt,
            max_tokens=data.max_tokens,
            default_max_tokens=COMPLETIONS_DEFAULT_MAX_TOKENS,
            logprobs=data.logprobs,
        )
        requests += choice_requests(data, base)
    return prompts, requests


def _logprobs(logprobs: Sequence[TokenLogprob], asked: bool, offset: int = 0) -> CompletionLogprobs | None:
    if not asked:
        return None
    offsets, position = [], offset
    for entry in logprobs:
        offsets.append(position)
        position += len(entry.token)
    return CompletionLogprobs(
        tokens=[entry.token for entry in logprobs],
        token_logprobs=[entry.logprob for entry in logprobs],
        top_logprobs=[{token: value for token, _, value in entry.top} for entry in logprobs],
        text_offset=offsets,
    )
