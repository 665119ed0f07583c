"""The OpenAI-compatible routes: /v1/models, /v1/completions and /v1/chat/completions.

Each handler translates between OpenAI's wire format (``protocol``) and the one pipeline; errors
use OpenAI's error object, and streams are server-sent events ending in ``data: [DONE]``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from litestar import Request, Router, get, post
from litestar.di import NamedDependency
from litestar.params import JSONBody
from litestar.response import Stream

from forgellm.core.api.openai.protocol import (
    CHAT_COMPLETION_EVENTS,
    COMPLETION_EVENTS,
    COMPLETIONS_DEFAULT_MAX_TOKENS,
    DONE,
    PREFIX,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    OpenAIError,
    PromptTokensDetails,
    SamplingFields,
    UsageBody,
    error_body,
    event,
)
from forgellm.core.api.pipeline import Caller, Generation, GenerationRequest, GenerationService
from forgellm.core.engine.generation import SamplingParams
from forgellm.core.errors import bad_request
from forgellm.core.http.errors import as_api_error, exception_handler
from forgellm.core.http.openapi import EVENT_STREAM, error_responses, json_body, streamed_as
from forgellm.core.http.strict_body import strict_body
from forgellm.core.identity import GENERATE, STATUS
from forgellm.core.server import Server

GENERATION_ERRORS = (400, 401, 403, 404, 413, 415, 429, 500, 503, 504)


def openai_errors(*statuses: int) -> dict[int, Any]:
    return error_responses(OpenAIError, *statuses)


def _generation_request(data: SamplingFields, default_max_tokens: int | None, **prompt: Any) -> GenerationRequest:
    """What both endpoints share, in the pipeline's terms; prompt is prompt= or messages=."""
    if data.n != 1:
        raise bad_request("Only n=1 is supported")
    if data.stream_options is not None and not data.stream:
        raise bad_request("stream_options is only allowed when stream is true")
    stop = data.stop if data.stop is None or isinstance(data.stop, list) else [data.stop]
    return GenerationRequest(
        max_tokens=data.max_completion_tokens if data.max_completion_tokens is not None else data.max_tokens,
        default_max_tokens=default_max_tokens,
        sampling=SamplingParams(temperature=data.temperature, top_p=data.top_p, seed=data.seed),
        stop=tuple(stop or ()),
        model=data.model,
        **prompt,
    )


def _usage(generation: Generation) -> UsageBody:
    usage = generation.completion().usage
    return UsageBody(
        usage.prompt_tokens,
        usage.completion_tokens,
        usage.total_tokens,
        PromptTokensDetails(generation.cached_prompt_tokens),
    )


@get(
    f"{PREFIX}/models",
    opt={"action": STATUS},
    summary="The models this server can serve now",
    responses=openai_errors(401, 403),
)
async def list_models(server: NamedDependency[Server]) -> ModelList:
    model = server.models.current
    return ModelList(data=[ModelCard(id=model.name)] if model is not None else [])


@post(
    f"{PREFIX}/completions",
    opt={"action": GENERATE},
    status_code=200,
    summary="OpenAI-compatible text completion",
    responses={
        **json_body(CompletionResponse, "The completion; with stream: true, server-sent events instead"),
        **openai_errors(*GENERATION_ERRORS),
    },
    operation_class=streamed_as(
        EVENT_STREAM, COMPLETION_EVENTS, "With stream: true, each event's data is one of these, then [DONE]"
    ),
)
async def completions(
    request: Request[Any, Any, Any],
    data: JSONBody[CompletionRequest],
    caller: NamedDependency[Caller],
    generations: NamedDependency[GenerationService],
) -> CompletionResponse | Stream:
    data = await strict_body(request, CompletionRequest)
    if isinstance(data.prompt, list):
        if len(data.prompt) != 1:
            raise bad_request("Only one prompt per request is supported")
        prompt = data.prompt[0]
    else:
        prompt = data.prompt
    generation = await generations.start(
        caller, _generation_request(data, COMPLETIONS_DEFAULT_MAX_TOKENS, prompt=prompt)
    )
    response_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(choices: list[CompletionChunkChoice], usage: UsageBody | None = None) -> CompletionChunk:
        return CompletionChunk(response_id, "text_completion", created, generation.model_name, choices, usage)

    if data.stream:
        return _events(
            generation,
            first=None,
            text=lambda text: chunk([CompletionChunkChoice(0, text, None, None)]),
            last=lambda reason: chunk([CompletionChunkChoice(0, "", None, reason)]),
            usage=(lambda: chunk([], _usage(generation))) if _include_usage(data) else None,
        )
    completion = await generation.complete()
    return CompletionResponse(
        id=response_id,
        created=created,
        model=generation.model_name,
        choices=[CompletionChoice(0, completion.text, completion.finish_reason)],  # type: ignore[arg-type]
        usage=_usage(generation),
    )


@post(
    f"{PREFIX}/chat/completions",
    opt={"action": GENERATE},
    status_code=200,
    summary="OpenAI-compatible chat completion",
    responses={
        **json_body(ChatCompletionResponse, "The completion; with stream: true, server-sent events instead"),
        **openai_errors(*GENERATION_ERRORS),
    },
    operation_class=streamed_as(
        EVENT_STREAM, CHAT_COMPLETION_EVENTS, "With stream: true, each event's data is one of these, then [DONE]"
    ),
)
async def chat_completions(
    request: Request[Any, Any, Any],
    data: JSONBody[ChatCompletionRequest],
    caller: NamedDependency[Caller],
    generations: NamedDependency[GenerationService],
) -> ChatCompletionResponse | Stream:
    data = await strict_body(request, ChatCompletionRequest)
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in data.messages]
    generation = await generations.start(caller, _generation_request(data, None, messages=messages))
    response_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(choices: list[ChatChunkChoice], usage: UsageBody | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(response_id, "chat.completion.chunk", created, generation.model_name, choices, usage)

    if data.stream:
        return _events(
            generation,
            first=chunk([ChatChunkChoice(0, ChatDelta(role="assistant", content=""), None, None)]),
            text=lambda text: chunk([ChatChunkChoice(0, ChatDelta(content=text), None, None)]),
            last=lambda reason: chunk([ChatChunkChoice(0, ChatDelta(), None, reason)]),
            usage=(lambda: chunk([], _usage(generation))) if _include_usage(data) else None,
        )
    completion = await generation.complete()
    return ChatCompletionResponse(
        id=response_id,
        created=created,
        model=generation.model_name,
        choices=[ChatChoice(0, AssistantMessage(completion.text), completion.finish_reason)],  # type: ignore[arg-type]
        usage=_usage(generation),
    )


def _include_usage(data: SamplingFields) -> bool:
    return bool(data.stream_options and data.stream_options.include_usage)


Chunk = CompletionChunk | ChatCompletionChunk


def _events(
    generation: Generation,
    *,
    first: Chunk | None,
    text: Callable[[str], Chunk],
    last: Callable[[Any], Chunk],
    usage: Callable[[], Chunk] | None,
) -> Stream:
    async def events() -> AsyncIterator[bytes]:
        if first is not None:
            yield event(first)
        try:
            async for delta in generation.text():
                yield event(text(delta))
        except Exception as exc:  # headers are sent: report in-band as OpenAI's servers do
            yield event(error_body(as_api_error(exc)))
            yield DONE
            return
        yield event(last(generation.completion().finish_reason))
        if usage is not None:
            yield event(usage())
        yield DONE

    # A header, not media_type=: Litestar lets the route's default (JSON) override a Stream's media_type.
    return Stream(events(), headers={"Content-Type": EVENT_STREAM, "Cache-Control": "no-cache"})


def openai_router() -> Router:
    """The OpenAI-compatible routes, answering errors in OpenAI's shape."""
    return Router(
        "/",
        route_handlers=[list_models, completions, chat_completions],
        exception_handlers={Exception: exception_handler(error_body)},
    )
