"""The OpenAI-compatible API: /v1/models, /v1/completions and /v1/chat/completions.

Same scheduler, same plugin hooks as the guide's API; errors use OpenAI's shape
(see errors.py) and streams are server-sent events ending in ``data: [DONE]``.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, AsyncIterator, Literal, Optional, Union

import msgspec
from litestar import Request, get, post
from litestar.params import JSONBody
from litestar.response import Stream

from forgellm.core import generation_service
from forgellm.core.access_control import GENERATE, STATUS
from forgellm.core.errors import ApiError, as_api_error, bad_request, openai_error
from forgellm.core.generation import Completion, GenerationJob, SamplingParams
from forgellm.core.request_body import strict_body
from forgellm.core.guide_api import max_tokens_for, stop_strings
from forgellm.core.scheduler import SequenceHandle
from forgellm.core.openapi_docs import (
    CHAT_COMPLETION_EVENTS,
    COMPLETION_EVENTS,
    EVENT_STREAM,
    json_body,
    openai_errors,
    streamed_as,
)

# OpenAI's documented default for /v1/completions.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class TextPart(msgspec.Struct):
    type: Literal["text"]
    text: str


class ChatMessage(msgspec.Struct):
    role: Literal["system", "user", "assistant", "developer"]
    content: Union[str, list[TextPart], None] = None


class _SamplingFields(msgspec.Struct):
    model: Optional[str] = None
    max_tokens: Optional[Annotated[int, msgspec.Meta(ge=1)]] = None
    max_completion_tokens: Optional[Annotated[int, msgspec.Meta(ge=1)]] = None
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] = 1.0
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] = 1.0
    seed: Optional[Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]] = None
    stop: Union[str, list[str], None] = None
    n: int = 1
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None


class CompletionRequest(_SamplingFields, kw_only=True):
    prompt: Union[str, list[str]]


class ChatCompletionRequest(_SamplingFields, kw_only=True):
    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1)]


class ModelCard(msgspec.Struct):
    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = "forgellm"


class ModelList(msgspec.Struct):
    data: list[ModelCard]
    object: str = "list"


class PromptTokensDetails(msgspec.Struct):
    cached_tokens: int  # prompt tokens whose KV was reused from an earlier request, not recomputed


class UsageBody(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class CompletionChoice(msgspec.Struct):
    index: int
    text: str
    finish_reason: str
    logprobs: None = None


class CompletionResponse(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageBody
    object: str = "text_completion"


class AssistantMessage(msgspec.Struct):
    content: str
    role: str = "assistant"


class ChatChoice(msgspec.Struct):
    index: int
    message: AssistantMessage
    finish_reason: str


class ChatCompletionResponse(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageBody
    object: str = "chat.completion"


def _usage(completion: Completion, handle: SequenceHandle) -> UsageBody:
    u = completion.usage
    return UsageBody(u.prompt_tokens, u.completion_tokens, u.total_tokens,
                     PromptTokensDetails(handle.cached_prompt_tokens))


def _check_common(request: Request, data: _SamplingFields) -> str:
    """Validate what both endpoints share; return the serving model's name."""
    if data.n != 1:
        raise bad_request("Only n=1 is supported")
    if data.stream_options is not None and not data.stream:
        raise bad_request("stream_options is only allowed when stream is true")
    model = generation_service.server_of(request).models.require_model()
    if data.model is not None and data.model != model.name:
        raise ApiError(404, f"The model '{data.model}' is not loaded; this server serves '{model.name}'", code="model_not_found")
    return model.name


def _job(request: Request, data: _SamplingFields, prompt_text: str, default_max: Optional[int]) -> GenerationJob:
    server = generation_service.server_of(request)
    requested = data.max_completion_tokens if data.max_completion_tokens is not None else data.max_tokens
    return GenerationJob(
        prompt_tokens=[],
        max_tokens=max_tokens_for(requested, server, default_max),
        sampling=SamplingParams(temperature=data.temperature, top_p=data.top_p, seed=data.seed),
        stop=stop_strings(data.stop),
        prompt_text=prompt_text,
    )


def _message_text(message: ChatMessage) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    return "".join(part.text for part in message.content)


@get(
    "/v1/models",
    opt={"action": STATUS},
    summary="The models this server can serve now",
    responses=openai_errors(401, 403),
)
async def list_models(request: Request) -> ModelList:
    model = generation_service.server_of(request).models.current
    return ModelList(data=[ModelCard(id=model.name)] if model is not None else [])


@post(
    "/v1/completions",
    opt={"action": GENERATE},
    status_code=200,
    summary="OpenAI-compatible text completion",
    responses={
        **json_body(CompletionResponse, "The completion; with stream: true, server-sent events instead"),
        **openai_errors(400, 401, 403, 404, 413, 429, 500, 503, 504),
    },
    operation_class=streamed_as(
        EVENT_STREAM, COMPLETION_EVENTS, "With stream: true, each event's data is one of these, then [DONE]"
    ),
)
async def completions(request: Request, data: JSONBody[CompletionRequest]) -> Union[CompletionResponse, Stream]:
    data = await strict_body(request, CompletionRequest)
    name = _check_common(request, data)
    if isinstance(data.prompt, list):
        if len(data.prompt) != 1:
            raise bad_request("Only one prompt per request is supported")
        prompt = data.prompt[0]
    else:
        prompt = data.prompt
    job = _job(request, data, prompt, COMPLETIONS_DEFAULT_MAX_TOKENS)
    handle = await generation_service.start(request, job, text=prompt)
    response_id = f"cmpl-{uuid.uuid4().hex}"
    if data.stream:
        include_usage = bool(data.stream_options and data.stream_options.include_usage)
        return _sse(request, handle, _CompletionChunks(response_id, name), include_usage)
    completion = await generation_service.complete(request, handle)
    return CompletionResponse(
        id=response_id,
        created=int(time.time()),
        model=name,
        choices=[CompletionChoice(0, completion.text, completion.finish_reason)],
        usage=_usage(completion, handle),
    )


@post(
    "/v1/chat/completions",
    opt={"action": GENERATE},
    status_code=200,
    summary="OpenAI-compatible chat completion",
    responses={
        **json_body(ChatCompletionResponse, "The completion; with stream: true, server-sent events instead"),
        **openai_errors(400, 401, 403, 404, 413, 429, 500, 503, 504),
    },
    operation_class=streamed_as(
        EVENT_STREAM, CHAT_COMPLETION_EVENTS, "With stream: true, each event's data is one of these, then [DONE]"
    ),
)
async def chat_completions(request: Request, data: JSONBody[ChatCompletionRequest]) -> Union[ChatCompletionResponse, Stream]:
    data = await strict_body(request, ChatCompletionRequest)
    name = _check_common(request, data)
    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": _message_text(m)} for m in data.messages
    ]
    job = _job(request, data, "\n".join(m["content"] for m in messages), None)
    handle = await generation_service.start(request, job, messages=messages)
    response_id = f"chatcmpl-{uuid.uuid4().hex}"
    if data.stream:
        include_usage = bool(data.stream_options and data.stream_options.include_usage)
        return _sse(request, handle, _ChatChunks(response_id, name), include_usage)
    completion = await generation_service.complete(request, handle)
    return ChatCompletionResponse(
        id=response_id,
        created=int(time.time()),
        model=name,
        choices=[ChatChoice(0, AssistantMessage(completion.text), completion.finish_reason)],
        usage=_usage(completion, handle),
    )


class _CompletionChunks:
    def __init__(self, response_id: str, model: str) -> None:
        self._base = {"id": response_id, "object": "text_completion", "created": int(time.time()), "model": model}

    def first(self) -> Optional[dict]:
        return None

    def text(self, text: str, finish_reason: Optional[str] = None) -> dict:
        return {**self._base, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}

    def last(self, finish_reason: str) -> dict:
        return self.text("", finish_reason)

    def usage(self, usage: UsageBody) -> dict:
        return {**self._base, "choices": [], "usage": msgspec.to_builtins(usage)}


class _ChatChunks(_CompletionChunks):
    def __init__(self, response_id: str, model: str) -> None:
        super().__init__(response_id, model)
        self._base["object"] = "chat.completion.chunk"

    def first(self) -> dict:
        return self._choice({"role": "assistant", "content": ""}, None)

    def text(self, text: str, finish_reason: Optional[str] = None) -> dict:
        return self._choice({"content": text}, finish_reason)

    def last(self, finish_reason: str) -> dict:
        return self._choice({}, finish_reason)

    def _choice(self, delta: dict, finish_reason: Optional[str]) -> dict:
        return {**self._base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def _event(payload: Union[dict, str]) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def _sse(request: Request, handle, chunks: _CompletionChunks, include_usage: bool) -> Stream:
    async def events() -> AsyncIterator[str]:
        first = chunks.first()
        if first is not None:
            yield _event(first)
        try:
            async for text in generation_service.stream(request, handle):
                yield _event(chunks.text(text))
        except Exception as exc:  # headers are sent: report in-band as OpenAI's servers do
            yield _event(openai_error(as_api_error(exc)))
            yield _event("[DONE]")
            return
        completion = handle.completion()
        yield _event(chunks.last(completion.finish_reason))
        if include_usage:
            yield _event(chunks.usage(_usage(completion, handle)))
        yield _event("[DONE]")

    # A header, not media_type=: Litestar lets the route's default (JSON) override a Stream's media_type.
    return Stream(events(), headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})


ROUTES = [list_models, completions, chat_completions]
