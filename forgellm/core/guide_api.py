"""The integration guide's API: /api/model/status, /load, /unload and /generate, in the guide's envelope."""

from __future__ import annotations

import json
from typing import Annotated, AsyncIterator, Literal, Optional, Union

import msgspec
from litestar import Request, get, post
from litestar.params import JSONBody
from litestar.response import Stream

from forgellm.core import generation_service
from forgellm.core.access_control import GENERATE, LOAD, STATUS
from forgellm.core.errors import as_api_error, bad_request
from forgellm.core.generation import GenerationJob, SamplingParams
from forgellm.core.request_body import strict_body
from forgellm.core.openapi_docs import NDJSON, any_of, envelope_errors, json_body, streamed_as

NonEmptyStr = Annotated[str, msgspec.Meta(min_length=1)]


class Message(msgspec.Struct):
    role: Literal["system", "user", "assistant"]
    content: str


class StatusResponse(msgspec.Struct):
    success: bool
    loaded: bool
    is_loading: bool
    model_name: Optional[str]
    adapter_path: Optional[str]
    error: Optional[str]
    progress: Optional[str]  # what a running load is doing; null otherwise


class LoadRequest(msgspec.Struct):
    model_name: NonEmptyStr
    adapter_path: Optional[NonEmptyStr] = None


class LoadResponse(msgspec.Struct):
    success: bool
    message: str
    model_name: str
    adapter_path: Optional[str]


class UnloadResponse(msgspec.Struct):
    success: bool
    message: str


class GenerateRequest(msgspec.Struct):
    prompt: str
    max_tokens: Optional[Annotated[int, msgspec.Meta(ge=1)]] = None
    # The guide names no default. Greedy, as mlx_lm.server's default: its clients send no temperature,
    # and a small model sampled at 0.7 often answers wrongly what it knows.
    temperature: Annotated[float, msgspec.Meta(ge=0, le=100)] = 0.0
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] = 1.0
    top_k: Annotated[int, msgspec.Meta(ge=0)] = 0
    min_p: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.0
    repetition_penalty: Optional[Annotated[float, msgspec.Meta(gt=0, le=100)]] = None
    seed: Optional[Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]] = None
    stop: Union[str, list[str], None] = None
    system_prompt: Optional[str] = None
    history: Optional[list[Message]] = None
    streaming: bool = False


class GenerateResponse(msgspec.Struct):
    success: bool
    text: str
    generation_time: float
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    tokens_per_sec: float
    finish_reason: str


class NdjsonChunk(msgspec.Struct):
    """A streamed line: text as it is generated."""

    type: Literal["chunk"]
    text: str


class NdjsonComplete(GenerateResponse):
    """The last streamed line of a successful generation: the plain response's body, tagged."""

    type: Literal["complete"]


class NdjsonError(msgspec.Struct):
    """The last streamed line of a generation that failed after the stream began."""

    type: Literal["error"]
    success: bool  # always false
    error: str


NDJSON_STREAM = any_of(NdjsonChunk, NdjsonComplete, NdjsonError)


def stop_strings(stop: Union[str, list[str], None]) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    if len(stops) > 16:
        raise bad_request("At most 16 stop strings are allowed")
    return tuple(s for s in stops if s)


def max_tokens_for(requested: Optional[int], server, default: Optional[int] = None) -> int:
    cap = server.settings.max_tokens_cap
    if requested is None:
        return min(default or server.settings.default_max_tokens, cap)
    if requested > cap:
        raise bad_request(f"max_tokens must be at most {cap}")
    return requested


def _conversation(data: GenerateRequest) -> list[dict]:
    messages = []
    if data.system_prompt:
        messages.append({"role": "system", "content": data.system_prompt})
    messages.extend({"role": m.role, "content": m.content} for m in data.history or ())
    messages.append({"role": "user", "content": data.prompt})
    return messages


@get(
    "/api/model/status",
    opt={"action": STATUS},
    summary="The model's load state",
    responses=envelope_errors(401, 403),
)
async def model_status(request: Request) -> StatusResponse:
    return StatusResponse(**generation_service.server_of(request).models.status())


@post(
    "/api/model/load",
    opt={"action": LOAD},
    status_code=200,
    summary="Start loading a model in the background",
    responses=envelope_errors(400, 401, 403, 409, 413),
)
async def load_model(request: Request, data: JSONBody[LoadRequest]) -> LoadResponse:
    data = await strict_body(request, LoadRequest)
    server = generation_service.server_of(request)
    server.models.check_load_target(data.model_name, data.adapter_path)
    server.models.start_load(data.model_name, data.adapter_path, from_client=True)
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
    responses=envelope_errors(401, 403, 409),
)
async def unload_model(request: Request) -> UnloadResponse:
    server = generation_service.server_of(request)
    name = server.models.state.model_name
    server.models.unload()
    return UnloadResponse(success=True, message=f"Model {name} unloaded" if name else "No model was loaded")


@post(
    "/api/model/generate",
    opt={"action": GENERATE},
    status_code=200,
    summary="Generate text",
    responses={
        **json_body(GenerateResponse, "The generation; with streaming: true, an NDJSON stream instead"),
        **envelope_errors(400, 401, 403, 413, 429, 500, 503, 504),
    },
    operation_class=streamed_as(
        NDJSON, NDJSON_STREAM, "With streaming: true, one object a line: chunks, then one complete (or error) line"
    ),
)
async def generate(request: Request, data: JSONBody[GenerateRequest]) -> Union[GenerateResponse, Stream]:
    data = await strict_body(request, GenerateRequest)
    server = generation_service.server_of(request)
    # Even a bare prompt is a user turn: instruction-tuned models answer properly only through their template.
    messages = _conversation(data)
    job = GenerationJob(
        prompt_tokens=[],
        max_tokens=max_tokens_for(data.max_tokens, server),
        sampling=SamplingParams(
            temperature=data.temperature,
            top_p=data.top_p,
            top_k=data.top_k,
            min_p=data.min_p,
            repetition_penalty=data.repetition_penalty,
            seed=data.seed,
        ),
        stop=stop_strings(data.stop),
        # The whole conversation, as on /v1/chat/completions: a guard must see the system prompt and history too.
        prompt_text="\n".join(message["content"] for message in messages),
    )
    handle = await generation_service.start(request, job, messages=messages)
    if data.streaming:
        # A header, not media_type=: Litestar lets the route's default (JSON) override a Stream's media_type.
        return Stream(_ndjson(request, handle), headers={"Content-Type": "application/x-ndjson"})
    return _response(await generation_service.complete(request, handle))


def _response(completion) -> GenerateResponse:
    return GenerateResponse(
        success=True,
        text=completion.text,
        generation_time=completion.generation_time,
        prompt_tokens=completion.usage.prompt_tokens,
        completion_tokens=completion.usage.completion_tokens,
        total_tokens=completion.usage.total_tokens,
        tokens_per_sec=completion.tokens_per_sec,
        finish_reason=completion.finish_reason,
    )


async def _ndjson(request: Request, handle) -> AsyncIterator[str]:
    """ForgeLLM's streaming format: chunk lines, then one complete line (or one error line)."""
    try:
        async for text in generation_service.stream(request, handle):
            yield json.dumps({"type": "chunk", "text": text}) + "\n"
    except Exception as exc:  # the status line is sent already: report the failure in-band
        yield json.dumps({"type": "error", "success": False, "error": as_api_error(exc).message}) + "\n"
        return
    # The complete line is the plain response's body, tagged: one definition of the counts for both.
    yield json.dumps({"type": "complete", **msgspec.to_builtins(_response(handle.completion()))}) + "\n"


ROUTES = [model_status, load_model, unload_model, generate]
