"""OpenAI's Responses API on the wire: the request, the response object, its output items and the typed
stream events (errors are OpenAI's error object, as on every /v1 route). Each shape is defined once
here; the routes encode and decode these, and the OpenAPI schema is generated from them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from forgellm import any_of, server_sent_event

PATH = "/v1/responses"

# -- the request ---------------------------------------------------------------------------------


class ContentPart(msgspec.Struct):
    """A part of an input message: input_text and output_text parts are served; any other type is a 400."""

    type: str
    text: str | None = None
    refusal: str | None = None


class InputItem(msgspec.Struct, forbid_unknown_fields=True):
    """One item of ``input``: a message (its ``type`` may be left out), a function call the model made, a function
    call's output, or a reasoning item (accepted, not shown to the model again, as chat templates drop past
    reasoning). Items from an earlier response's ``output`` can be sent back as they are."""

    type: Literal["message", "function_call", "function_call_output", "reasoning"] = "message"
    role: Literal["user", "assistant", "system", "developer"] | None = None
    content: str | list[ContentPart] | None = None
    id: str | None = None
    status: str | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | list[ContentPart] | None = None
    summary: list[Any] | None = None
    encrypted_content: str | None = None


class FunctionTool(msgspec.Struct, forbid_unknown_fields=True):
    type: Literal["function"]
    name: Annotated[str, msgspec.Meta(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments
    description: str | None = None
    strict: bool | None = None  # a forced call is generated under the schema's grammar anyway


class NamedToolChoice(msgspec.Struct, forbid_unknown_fields=True):
    type: Literal["function"]
    name: str


class TextFormat(msgspec.Struct, forbid_unknown_fields=True):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema: dict[str, Any] | None = None
    description: str | None = None
    strict: bool | None = None  # every output is generated under the schema's grammar anyway


class TextOptions(msgspec.Struct, forbid_unknown_fields=True):
    format: TextFormat | None = None
    verbosity: str | None = None  # accepted; no effect on this server's models


class ReasoningOptions(msgspec.Struct, forbid_unknown_fields=True):
    effort: str | None = None  # passed to the chat template as reasoning_effort
    summary: str | None = None  # accepted; reasoning is returned whole, not summarized
    generate_summary: str | None = None


class StreamOptions(msgspec.Struct, forbid_unknown_fields=True):
    include_obfuscation: bool | None = None  # accepted; no obfuscation padding is sent


# OpenAI's bounds: 16 pairs, keys of at most 64 characters, values of at most 512.
Metadata = Annotated[
    dict[Annotated[str, msgspec.Meta(max_length=64)], Annotated[str, msgspec.Meta(max_length=512)]],
    msgspec.Meta(max_length=16),
]


class ResponseRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Every field of OpenAI's request is here: honoured, accepted without effect (docs/responses.md says which),
    or refused with a 400 that names it."""

    input: str | list[InputItem]
    model: str | None = None
    instructions: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextOptions | None = None
    max_output_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    # Left out: the model's defaults (the operator's, its generation_config.json), else OpenAI's (1.0).
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] | None = None
    top_logprobs: Annotated[int, msgspec.Meta(ge=0, le=20)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    previous_response_id: str | None = None
    store: bool = True
    include: list[str] | None = None
    reasoning: ReasoningOptions | None = None
    truncation: Literal["disabled"] | None = None  # "auto" (dropping the conversation's start) is not offered
    # Accepted without effect, and stored with the response: bounded as OpenAI bounds it.
    metadata: Metadata | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    service_tier: str | None = None
    # Refused when set: nothing on this server could carry them out.
    background: bool | None = None
    conversation: Any | None = None
    prompt: Any | None = None
    max_tool_calls: int | None = None


# -- the response --------------------------------------------------------------------------------


class OutputText(msgspec.Struct, tag_field="type", tag="output_text"):
    text: str
    annotations: list[Any] = msgspec.field(default_factory=list)
    logprobs: list[Any] = msgspec.field(default_factory=list)


class ReasoningText(msgspec.Struct, tag_field="type", tag="reasoning_text"):
    text: str


class MessageItem(msgspec.Struct, tag_field="type", tag="message"):
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    content: list[OutputText]
    role: Literal["assistant"] = "assistant"


class FunctionCallItem(msgspec.Struct, tag_field="type", tag="function_call"):
    id: str
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"]


class ReasoningItem(msgspec.Struct, tag_field="type", tag="reasoning"):
    id: str
    content: list[ReasoningText]
    summary: list[Any] = msgspec.field(default_factory=list)
    status: Literal["in_progress", "completed", "incomplete"] | None = None


OutputItem = MessageItem | FunctionCallItem | ReasoningItem
OutputPart = OutputText | ReasoningText


class InputTokensDetails(msgspec.Struct):
    cached_tokens: int


class ResponseUsage(msgspec.Struct):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: InputTokensDetails


class IncompleteDetails(msgspec.Struct):
    reason: Literal["max_output_tokens", "timeout"]  # timeout: the server's --request-timeout ended it


class ResponseErrorDetail(msgspec.Struct):
    code: str
    message: str


class ResponseObject(msgspec.Struct):
    id: str
    created_at: int
    model: str
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    output: list[OutputItem]
    usage: ResponseUsage | None
    error: ResponseErrorDetail | None
    incomplete_details: IncompleteDetails | None
    instructions: str | None
    max_output_tokens: int | None
    previous_response_id: str | None
    temperature: float
    top_p: float
    parallel_tool_calls: bool
    tool_choice: Any
    tools: list[FunctionTool]
    text: TextOptions
    store: bool
    metadata: dict[str, str]
    object: Literal["response"] = "response"
    truncation: Literal["disabled"] = "disabled"


class DeletedResponse(msgspec.Struct):
    id: str
    deleted: bool = True
    object: Literal["response.deleted"] = "response.deleted"


# -- stream events -------------------------------------------------------------------------------
# Each event's ``type`` is its SSE event name too; ``sequence_number`` counts from 0 within a stream.


class ResponseLifecycleEvent(msgspec.Struct, kw_only=True):
    """response.created, response.in_progress, response.completed, response.incomplete, response.failed."""

    type: str
    sequence_number: int
    response: ResponseObject


class OutputItemEvent(msgspec.Struct, kw_only=True):
    """response.output_item.added and response.output_item.done."""

    type: str
    sequence_number: int
    output_index: int
    item: OutputItem


class ContentPartEvent(msgspec.Struct, kw_only=True):
    """response.content_part.added and response.content_part.done."""

    type: str
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    part: OutputPart


class TextDeltaEvent(msgspec.Struct, kw_only=True):
    """response.output_text.delta and response.reasoning_text.delta."""

    type: str
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: list[Any] | None = None


class TextDoneEvent(msgspec.Struct, kw_only=True):
    """response.output_text.done and response.reasoning_text.done."""

    type: str
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list[Any] | None = None


class ArgumentsDeltaEvent(msgspec.Struct, kw_only=True):
    type: Literal["response.function_call_arguments.delta"] = "response.function_call_arguments.delta"
    sequence_number: int
    item_id: str
    output_index: int
    delta: str


class ArgumentsDoneEvent(msgspec.Struct, kw_only=True):
    type: Literal["response.function_call_arguments.done"] = "response.function_call_arguments.done"
    sequence_number: int
    item_id: str
    output_index: int
    name: str
    arguments: str


class ErrorEvent(msgspec.Struct, kw_only=True):
    type: Literal["error"] = "error"
    sequence_number: int
    code: str | None
    message: str
    param: None = None


StreamEvent = (
    ResponseLifecycleEvent
    | OutputItemEvent
    | ContentPartEvent
    | TextDeltaEvent
    | TextDoneEvent
    | ArgumentsDeltaEvent
    | ArgumentsDoneEvent
    | ErrorEvent
)

STREAM_EVENTS = server_sent_event(
    any_of(
        ResponseLifecycleEvent,
        OutputItemEvent,
        ContentPartEvent,
        TextDeltaEvent,
        TextDoneEvent,
        ArgumentsDeltaEvent,
        ArgumentsDoneEvent,
        ErrorEvent,
    ),
    done_marker=False,
)

_encoder = msgspec.json.Encoder()


def encode_event(event: StreamEvent) -> bytes:
    """One server-sent event, named by its type, as OpenAI's Responses streams are."""
    return b"event: " + event.type.encode() + b"\ndata: " + _encoder.encode(event) + b"\n\n"
