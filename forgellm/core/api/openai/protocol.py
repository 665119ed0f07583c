"""The OpenAI-compatible API's wire format: requests, responses, stream chunks and the error object.

These Structs are the one definition of each shape: the routes decode and encode them, every
server-sent event is encoded from them, and the OpenAPI schema is generated from them. Optional
fields that OpenAI leaves out when unset are left out here too (``omit_defaults``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

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


class StreamOptions(msgspec.Struct, forbid_unknown_fields=True):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # accepted and ignored: no obfuscation padding is sent


class ContentPart(msgspec.Struct):
    """A part of a message's content; only text parts can be served (others are a 400 naming their type)."""

    type: str
    text: str | None = None


class FunctionCall(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    arguments: str  # a JSON object, as text


class ToolCallBody(msgspec.Struct, forbid_unknown_fields=True):
    id: str
    function: FunctionCall
    type: Literal["function"] = "function"


class ChatMessage(msgspec.Struct, forbid_unknown_fields=True):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None  # accepted and ignored: the chat template decides how speakers are named
    tool_calls: list[ToolCallBody] | None = None  # an assistant's calls, earlier in the conversation
    tool_call_id: str | None = None  # a tool message answers this call
    refusal: str | None = None  # an earlier assistant refusal, rendered as its content
    reasoning_content: str | None = None  # an earlier assistant's reasoning; not sent back to the model


class FunctionDefinition(msgspec.Struct, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments
    strict: bool | None = None  # every call is generated under the schema's grammar anyway


class Tool(msgspec.Struct, forbid_unknown_fields=True):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(msgspec.Struct, forbid_unknown_fields=True):
    name: str


class NamedToolChoice(msgspec.Struct, forbid_unknown_fields=True):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(msgspec.Struct, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    schema: dict[str, Any] | None = None
    description: str | None = None
    strict: bool | None = None  # every output is generated under the schema's grammar anyway


class ResponseFormat(msgspec.Struct, forbid_unknown_fields=True):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


LogitBias = dict[str, Annotated[float, msgspec.Meta(ge=-100, le=100)]]
MAX_CHOICES = 16  # n, and prompts per completion request, at most


class Prediction(msgspec.Struct, forbid_unknown_fields=True):
    """OpenAI's Predicted Outputs: text the answer is expected to repeat (mostly), such as a file being edited."""

    content: str | list[ContentPart]
    type: Literal["content"] = "content"


class SamplingFields(msgspec.Struct, forbid_unknown_fields=True):
    """What both endpoints take; every field OpenAI defines is here, honoured, ignored as documented
    (docs/openai-fields.md), or refused with a 400 that names it."""

    model: str | None = None
    max_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    # Left out: the model's defaults (the operator's, its generation_config.json), else OpenAI's (1.0, 1.0).
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] | None = None
    seed: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)] | None = None
    stop: str | list[str] | None = None
    n: Annotated[int, msgspec.Meta(ge=1, le=MAX_CHOICES)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Annotated[float, msgspec.Meta(ge=-2, le=2)] = 0.0
    frequency_penalty: Annotated[float, msgspec.Meta(ge=-2, le=2)] = 0.0
    logit_bias: LogitBias | None = None
    # Extensions other servers accept too (vLLM, llama.cpp, mlx_lm.server).
    top_k: Annotated[int, msgspec.Meta(ge=0)] | None = None
    min_p: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, msgspec.Meta(ge=0, le=100)] | None = None  # 0: none, as mlx_lm.server
    # mlx_lm.server's own, with its meaning (docs/openai-fields.md).
    repetition_context_size: Annotated[int, msgspec.Meta(ge=1, le=65536)] | None = None
    presence_context_size: Annotated[int, msgspec.Meta(ge=1, le=65536)] | None = None
    frequency_context_size: Annotated[int, msgspec.Meta(ge=1, le=65536)] | None = None
    xtc_probability: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.0
    xtc_threshold: Annotated[float, msgspec.Meta(ge=0, le=0.5)] = 0.1
    num_draft_tokens: Annotated[int, msgspec.Meta(ge=0)] | None = None  # accepted and ignored: the server decides
    draft_model: str | None = None  # refused unless mlx_lm.server's "default_model": --draft-model decides
    adapters: str | None = None  # refused: an adapter is served under a model name of its own
    # Accepted and ignored (docs/openai-fields.md says why).
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None


class CompletionRequest(SamplingFields, kw_only=True, forbid_unknown_fields=True):
    # A string, a list of strings, a list of token ids, or a list of token-id lists: one choice per prompt.
    prompt: str | list[str | int | list[int]]  # (msgspec takes one list type in a union; the routes check which)
    logprobs: Annotated[int, msgspec.Meta(ge=0, le=5)] | None = None
    echo: bool = False
    best_of: Annotated[int, msgspec.Meta(ge=1)] | None = None  # only 1 (the default) is served
    suffix: str | None = None  # refused: no insertion
    role_mapping: dict[str, str] | None = None  # mlx_lm.server's; refused: prompts are sent as they are


class ChatCompletionRequest(SamplingFields, kw_only=True, forbid_unknown_fields=True):
    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1)]
    max_completion_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, msgspec.Meta(ge=0, le=20)] | None = None
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # extension: options for the chat template
    reasoning_effort: str | None = None  # accepted and ignored: the template's own options control thinking
    verbosity: str | None = None  # accepted and ignored
    prompt_cache_options: dict[str, Any] | None = None  # accepted and ignored: prefixes are cached automatically
    prompt_cache_retention: str | None = None  # accepted and ignored: --prompt-cache-size bounds the cache
    modalities: list[str] | None = None  # only ["text"]
    prediction: Prediction | None = None  # drafts for speculative decoding; the output is the model's own
    # Refused when set: this server generates text for one conversation, nothing else.
    audio: Any | None = None
    web_search_options: Any | None = None
    functions: Any | None = None
    function_call: Any | None = None
    moderation: Any | None = None


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


class CompletionTokensDetails(msgspec.Struct):
    # Predicted Outputs: tokens of the prediction the output kept, and those tried and not kept.
    accepted_prediction_tokens: int
    rejected_prediction_tokens: int


class UsageBody(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    completion_tokens_details: CompletionTokensDetails


# "timeout": --request-timeout ended the generation; the text is what it had generated by then.
FinishReason = Literal["stop", "length", "tool_calls", "timeout"]


# -- logprobs ------------------------------------------------------------------------------------


class TopLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobBody(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(msgspec.Struct):
    """A chat choice's logprobs: one entry per generated token."""

    content: list[TokenLogprobBody] | None
    refusal: None = None


class CompletionLogprobs(msgspec.Struct):
    """A completion choice's logprobs, in the legacy completions shape."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


# -- completions ---------------------------------------------------------------------------------


class CompletionChoice(msgspec.Struct):
    index: int
    text: str
    finish_reason: FinishReason
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageBody
    object: str = "text_completion"


# -- chat completions ----------------------------------------------------------------------------


class ToolCallResponse(msgspec.Struct):
    id: str
    function: FunctionCall
    type: Literal["function"] = "function"


class AssistantMessage(msgspec.Struct, omit_defaults=True):
    role: Literal["assistant"]
    content: str | None  # null when the answer is tool calls only
    tool_calls: list[ToolCallResponse] | None = None
    reasoning_content: str | None = None  # what a reasoning model thought before answering


class ChatChoice(msgspec.Struct):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: ChatLogprobs | None = None


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
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason | None


class CompletionChunk(msgspec.Struct, omit_defaults=True):
    """One /v1/completions event; the last, with stream_options.include_usage, has no choices and the usage."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: UsageBody | None = None


class FunctionCallDelta(msgspec.Struct, omit_defaults=True):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(msgspec.Struct, omit_defaults=True):
    """A streamed call: its first delta has the index, id, type and name; later ones, argument fragments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta | None = None


class ChatDelta(msgspec.Struct, omit_defaults=True):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(msgspec.Struct):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
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
