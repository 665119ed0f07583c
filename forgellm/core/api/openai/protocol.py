"""The OpenAI-compatible API's wire format: requests, responses, stream chunks and the error object.

These Structs are the one definition of each shape: the routes decode and encode them, every
server-sent event is encoded from them, and the OpenAPI schema is generated from them. Optional
fields that OpenAI leaves out when unset are left out here too (``omit_defaults``).
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from forgellm.core.errors import ApiError
from forgellm.core.http.openapi import any_of, server_sent_event

PREFIX = "/v1"

# OpenAI's documented default for /v1/completions.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    503: "server_overloaded",
}


class OpenAIErrorDetail(msgspec.Struct):
    message: str
    type: str
    param: None
    code: str | None


class OpenAIError(msgspec.Struct):
    """OpenAI's error body, on every /v1 route."""

    error: OpenAIErrorDetail


def error_body(error: ApiError) -> OpenAIError:
    kind = _ERROR_TYPES.get(error.status_code, "server_error")
    return OpenAIError(OpenAIErrorDetail(message=error.message, type=kind, param=None, code=error.code))


# -- requests ------------------------------------------------------------------------------------


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class TextPart(msgspec.Struct):
    type: Literal["text"]
    text: str


class ChatMessage(msgspec.Struct):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart] | None = None

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class SamplingFields(msgspec.Struct):
    model: str | None = None
    max_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    max_completion_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] = 1.0
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] = 1.0
    seed: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)] | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None


class CompletionRequest(SamplingFields, kw_only=True):
    prompt: str | list[str]


class ChatCompletionRequest(SamplingFields, kw_only=True):
    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1)]


# -- responses -----------------------------------------------------------------------------------


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


FinishReason = Literal["stop", "length"]


class CompletionChoice(msgspec.Struct):
    index: int
    text: str
    finish_reason: FinishReason
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
    finish_reason: FinishReason


class ChatCompletionResponse(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageBody
    object: str = "chat.completion"


# -- stream chunks (stream: true) ----------------------------------------------------------------


class CompletionChunkChoice(msgspec.Struct):
    index: int
    text: str
    logprobs: None
    finish_reason: FinishReason | None


class CompletionChunk(msgspec.Struct, omit_defaults=True):
    """One /v1/completions event; the last, with stream_options.include_usage, has no choices and the usage."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: UsageBody | None = None


class ChatDelta(msgspec.Struct, omit_defaults=True):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(msgspec.Struct):
    index: int
    delta: ChatDelta
    logprobs: None
    finish_reason: FinishReason | None


class ChatCompletionChunk(msgspec.Struct, omit_defaults=True):
    """One /v1/chat/completions event; the last, with stream_options.include_usage, has no choices and the usage."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageBody | None = None


COMPLETION_EVENTS = server_sent_event(any_of(CompletionChunk, OpenAIError))
CHAT_COMPLETION_EVENTS = server_sent_event(any_of(ChatCompletionChunk, OpenAIError))
DONE = b"data: [DONE]\n\n"

_encoder = msgspec.json.Encoder()


def event(payload: CompletionChunk | ChatCompletionChunk | OpenAIError) -> bytes:
    """One server-sent event carrying this chunk."""
    return b"data: " + _encoder.encode(payload) + b"\n\n"
