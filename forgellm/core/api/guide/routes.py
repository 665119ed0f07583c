"""The integration guide's routes: /api/model/status, /load, /unload and /generate, in the guide's envelope.

Each handler translates between the guide's wire format (``protocol``) and the server: generate
builds a GenerationRequest for the one pipeline and encodes what it returns.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from litestar import Router, get, post
from litestar.di import NamedDependency
from litestar.response import Stream

from forgellm.core.api.generation import Generation
from forgellm.core.api.guide.protocol import (
    NDJSON_STREAM,
    ErrorEnvelope,
    GenerateRequest,
    GenerateResponse,
    LoadRequest,
    LoadResponse,
    Message,
    NdjsonChunk,
    NdjsonComplete,
    NdjsonError,
    StatusResponse,
    UnloadResponse,
    error_body,
    ndjson_line,
)
from forgellm.core.api.pipeline import GenerationService
from forgellm.core.api.request import Caller, GenerationRequest, client_sampling
from forgellm.core.engine.generation import Constraint, SamplingParams
from forgellm.core.errors import ApiError
from forgellm.core.http.errors import exception_handler
from forgellm.core.http.json_route import json_post
from forgellm.core.http.openapi import NDJSON, error_responses, json_body, streamed_as
from forgellm.core.http.streaming import streamed
from forgellm.core.identity import GENERATE, LOAD, STATUS
from forgellm.core.server import Server


def guide_errors(*statuses: int) -> dict[int, Any]:
    return error_responses(ErrorEnvelope, *statuses)


@get("/api/model/status", opt={"action": STATUS}, summary="The model's load state", responses=guide_errors(401, 403))
async def model_status(server: NamedDependency[Server]) -> StatusResponse:
    return StatusResponse.of(server.default_model.slot.state)


@json_post(
    "/api/model/load",
    LoadRequest,
    opt={"action": LOAD},
    status_code=200,
    summary="Start loading a model in the background",
    responses=guide_errors(400, 401, 403, 409, 413, 415),
)
async def load_model(data: LoadRequest, server: NamedDependency[Server]) -> LoadResponse:
    await server.registry.load_default(data.model_name, data.adapter_path)
    return LoadResponse(
        success=True,
        message=f"Model {data.model_name} loading started",
        model_name=data.model_name,
        adapter_path=data.adapter_path,
    )


@post(
    "/api/model/unload",
    opt={"action": LOAD},
    status_code=200,
    summary="Unload the model and free its memory",
    responses=guide_errors(401, 403, 409, 415),
)
async def unload_model(server: NamedDependency[Server]) -> UnloadResponse:
    name = server.default_model.slot.state.model_name
    server.registry.unload_default()  # answers at once; the model goes once its generations finish
    return UnloadResponse(success=True, message=f"Model {name} unloaded" if name else "No model was loaded")


@json_post(
    "/api/model/generate",
    GenerateRequest,
    opt={"action": GENERATE},
    status_code=200,
    summary="Generate text",
    responses={
        **json_body(GenerateResponse, "The generation; with streaming: true, an NDJSON stream instead"),
        **guide_errors(400, 401, 403, 413, 415, 429, 500, 503, 504),
    },
    operation_class=streamed_as(
        NDJSON, NDJSON_STREAM, "With streaming: true, one object a line: chunks, then one complete (or error) line"
    ),
)
async def generate(
    data: GenerateRequest,
    caller: NamedDependency[Caller],
    generations: NamedDependency[GenerationService],
    server: NamedDependency[Server],
) -> GenerateResponse | Stream:
    generation = await generations.start(caller, _generation_request(data, server.config.default_max_tokens))
    if data.streaming:
        return streamed(_ndjson(generation), NDJSON, on_failure=_failed)
    return GenerateResponse.of(await generation.complete())


def _generation_request(data: GenerateRequest, default_max_tokens: int) -> GenerationRequest:
    # Even a bare prompt is a user turn: instruction-tuned models answer properly only through their template.
    history = [Message("system", data.system_prompt)] if data.system_prompt else []
    history += [*(data.history or ()), Message("user", data.prompt)]
    stop = data.stop if data.stop is None or isinstance(data.stop, list) else [data.stop]
    sampling, given = client_sampling(
        SamplingParams(seed=data.seed),  # greedy unless asked otherwise
        temperature=data.temperature,
        top_p=data.top_p,
        top_k=data.top_k,
        min_p=data.min_p,
        repetition_penalty=data.repetition_penalty,
    )
    return GenerationRequest(
        messages=[{"role": message.role, "content": message.content} for message in history],
        max_tokens=data.max_tokens,
        default_max_tokens=default_max_tokens,
        sampling=sampling,
        sampling_given=given,
        stop=tuple(stop or ()),
        constraint=None if data.json_schema is None else Constraint(data.json_schema),
    )


async def _ndjson(generation: Generation) -> AsyncIterator[bytes]:
    """The guide's streaming format: chunk lines, then one complete line (or one error line: _failed)."""
    async for delta in generation.deltas():
        yield ndjson_line(NdjsonChunk(text=delta.text))
    yield ndjson_line(NdjsonComplete.of(generation.completion()))


def _failed(error: ApiError) -> list[bytes]:
    return [ndjson_line(NdjsonError(success=False, error=error.message))]


def guide_router() -> Router:
    """The guide's routes, answering errors in its envelope."""
    return Router(
        "/",
        route_handlers=[model_status, load_model, unload_model, generate],
        exception_handlers={Exception: exception_handler(error_body)},
    )
