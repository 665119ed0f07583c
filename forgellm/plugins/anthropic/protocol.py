"""Anthropic's Messages API on the wire: the request, the message, the stream events and the error object.
Each shape is defined once here; the routes encode and decode these and the OpenAPI schema is generated
from them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from forgellm import ApiError, any_of, server_sent_event

PATH = "/v1/messages"

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    415: "invalid_request_error",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
}


class ErrorDetail(msgspec.Struct):
    type: str
    message: str


class AnthropicError(msgspec.Struct, tag_field="type", tag="error"):
    """The error body of every Messages route, and the data of a stream's error event."""

    error: ErrorDetail


def error_body(error: ApiError) -> AnthropicError:
    return AnthropicError(ErrorDetail(_ERROR_TYPES.get(error.status_code, "api_error"), error.message))


# -- the request ---------------------------------------------------------------------------------


class ResultPart(msgspec.Struct):
    """A part of a tool result's content: text is served; any other type is a 400."""

    type: str
    text: str | None = None
    cache_control: dict[str, Any] | None = None


class ContentBlock(msgspec.Struct, forbid_unknown_fields=True):
    """A block of a message's content: text, tool_use (an assistant's call), tool_result (a user's answer to one)
    and thinking blocks are served; images and documents are a 400 naming their type. ``cache_control`` and
    ``citations`` are accepted without effect (prompt prefixes are cached automatically)."""

    type: str
    text: str | None = None
    id: str | None = None
    name: str | None = None
    input: dict[str, Any] | None = None
    tool_use_id: str | None = None
    content: str | list[ResultPart] | None = None
    is_error: bool | None = None
    thinking: str | None = None
    signature: str | None = None
    data: str | None = None
    source: dict[str, Any] | None = None
    cache_control: dict[str, Any] | None = None
    citations: list[Any] | None = None


class Message(msgspec.Struct, forbid_unknown_fields=True):
    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]


class SystemBlock(msgspec.Struct, forbid_unknown_fields=True):
    type: Literal["text"]
    text: str
    cache_control: dict[str, Any] | None = None
    citations: list[Any] | None = None


class Tool(msgspec.Struct, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(pattern=r"^[a-zA-Z0-9_-]{1,128}$")]
    input_schema: dict[str, Any]
    description: str | None = None
    type: Literal["custom"] | None = None
    cache_control: dict[str, Any] | None = None
    strict: bool | None = None  # a forced call is generated under the schema's grammar anyway


class ToolChoice(msgspec.Struct, forbid_unknown_fields=True):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class Thinking(msgspec.Struct, forbid_unknown_fields=True):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = None


class Metadata(msgspec.Struct, forbid_unknown_fields=True):
    user_id: str | None = None


class CountTokensRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What ``count_tokens`` takes: the conversation as a message request would send it."""

    messages: Annotated[list[Message], msgspec.Meta(min_length=1)]
    model: str | None = None
    system: str | list[SystemBlock] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None  # "enabled" turns on the chat template's enable_thinking


class MessagesRequest(CountTokensRequest, kw_only=True, forbid_unknown_fields=True):
    """Every field of Anthropic's request is here: honoured, accepted without effect (docs/anthropic.md), or
    refused with a 400 that names it."""

    max_tokens: Annotated[int, msgspec.Meta(ge=1)]
    stop_sequences: list[str] | None = None
    # Left out: the model's defaults (the operator's, its generation_config.json), else Anthropic's (1.0).
    temperature: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] | None = None
    top_k: Annotated[int, msgspec.Meta(ge=0)] | None = None
    stream: bool = False
    # Accepted without effect.
    metadata: Metadata | None = None
    service_tier: str | None = None
    # Refused when set: nothing on this server could carry them out.
    container: Any | None = None
    mcp_servers: Any | None = None
    context_management: Any | None = None


# -- the message ---------------------------------------------------------------------------------


class TextBlock(msgspec.Struct, tag_field="type", tag="text"):
    text: str


class ToolUseBlock(msgspec.Struct, tag_field="type", tag="tool_use"):
    id: str
    name: str
    input: dict[str, Any]


class ThinkingBlock(msgspec.Struct, tag_field="type", tag="thinking"):
    thinking: str
    signature: str = ""  # nothing is signed: a thinking block sent back is accepted as it is


OutputBlock = TextBlock | ToolUseBlock | ThinkingBlock
StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


class MessageUsage(msgspec.Struct):
    input_tokens: int
    output_tokens: int
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0


class MessageResponse(msgspec.Struct, tag_field="type", tag="message"):
    id: str
    model: str
    content: list[OutputBlock]
    stop_reason: StopReason | None
    stop_sequence: str | None
    usage: MessageUsage
    role: Literal["assistant"] = "assistant"


class TokenCount(msgspec.Struct):
    input_tokens: int


# -- stream events -------------------------------------------------------------------------------


class MessageStart(msgspec.Struct, tag_field="type", tag="message_start"):
    message: MessageResponse


class ContentBlockStart(msgspec.Struct, tag_field="type", tag="content_block_start"):
    index: int
    content_block: OutputBlock


class TextDelta(msgspec.Struct, tag_field="type", tag="text_delta"):
    text: str


class InputJsonDelta(msgspec.Struct, tag_field="type", tag="input_json_delta"):
    partial_json: str


class ThinkingDelta(msgspec.Struct, tag_field="type", tag="thinking_delta"):
    thinking: str


class ContentBlockDelta(msgspec.Struct, tag_field="type", tag="content_block_delta"):
    index: int
    delta: TextDelta | InputJsonDelta | ThinkingDelta


class ContentBlockStop(msgspec.Struct, tag_field="type", tag="content_block_stop"):
    index: int


class StopDelta(msgspec.Struct):
    stop_reason: StopReason
    stop_sequence: str | None


class DeltaUsage(msgspec.Struct):
    """The message's usage once it ends (what message_start said of the input is before the prompt cache was
    consulted)."""

    output_tokens: int
    input_tokens: int
    cache_read_input_tokens: int


class MessageDelta(msgspec.Struct, tag_field="type", tag="message_delta"):
    delta: StopDelta
    usage: DeltaUsage


class MessageStop(msgspec.Struct, tag_field="type", tag="message_stop"):
    pass


class Ping(msgspec.Struct, tag_field="type", tag="ping"):
    pass


StreamEvent = (
    MessageStart
    | ContentBlockStart
    | ContentBlockDelta
    | ContentBlockStop
    | MessageDelta
    | MessageStop
    | Ping
    | AnthropicError
)

STREAM_EVENTS = server_sent_event(
    any_of(
        MessageStart,
        ContentBlockStart,
        ContentBlockDelta,
        ContentBlockStop,
        MessageDelta,
        MessageStop,
        Ping,
        AnthropicError,
    ),
    done_marker=False,
)

_encoder = msgspec.json.Encoder()


def encode_event(event: StreamEvent) -> bytes:
    """One server-sent event, named by its type, as Anthropic's streams are."""
    name = str(event.__struct_config__.tag)
    return b"event: " + name.encode() + b"\ndata: " + _encoder.encode(event) + b"\n\n"
