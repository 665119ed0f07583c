"""``POST /v1/messages`` and ``POST /v1/messages/count_tokens``: Anthropic's Messages API over the pipeline.

A request's system prompt and messages become a conversation of chat-template messages (tool_use blocks
an assistant's calls, tool_result blocks tool messages); the generation's text is read as an
assistant's turn and returned as content blocks, whole or as Anthropic's stream events.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any, Literal

from litestar import Router
from litestar.di import NamedDependency
from litestar.response import Stream

from forgellm import (
    EVENT_STREAM,
    GENERATE,
    ApiError,
    Caller,
    Generation,
    GenerationRequest,
    GenerationService,
    SamplingParams,
    ToolChoice,
    bad_request,
    client_sampling,
    error_responses,
    exception_handler,
    generation_post,
    json_post,
    streamed,
    template_tool,
    template_tool_call,
)
from forgellm.plugins.anthropic.content import ContentBuilder
from forgellm.plugins.anthropic.protocol import (
    PATH,
    STREAM_EVENTS,
    AnthropicError,
    ContentBlock,
    CountTokensRequest,
    DeltaUsage,
    MessageDelta,
    MessageResponse,
    MessagesRequest,
    MessageStart,
    MessageStop,
    MessageUsage,
    Ping,
    StopDelta,
    StopReason,
    SystemBlock,
    TokenCount,
    encode_event,
    error_body,
)

_TOOL_CHOICE_MODES: dict[str, Literal["auto", "none", "required"]] = {"auto": "auto", "any": "required", "none": "none"}


# -- request translation -------------------------------------------------------------------------


def _result_text(block: ContentBlock, where: str) -> str:
    content = block.content
    if content is None or isinstance(content, str):
        text = content or ""
    else:
        for part in content:
            if part.type != "text":
                raise bad_request(f"{where} has a {part.type} part; only text is supported by this server")
        text = "".join(part.text or "" for part in content)
    return f"Error: {text}" if block.is_error else text


def _system(system: str | list[SystemBlock] | None) -> list[dict[str, Any]]:
    text = system if isinstance(system, str) or system is None else "\n\n".join(block.text for block in system)
    return [{"role": "system", "content": text}] if text else []


def conversation_of(data: CountTokensRequest) -> list[dict[str, Any]]:
    """The system prompt and messages as chat-template messages: an assistant's tool_use blocks are its calls, a
    user's tool_result blocks are tool messages (before the user's text), thinking blocks are left out (chat
    templates drop earlier turns' reasoning)."""
    messages = _system(data.system)
    for number, message in enumerate(data.messages):
        if isinstance(message.content, str):
            messages.append({"role": message.role, "content": message.content})
            continue
        text, calls, results = [], [], []
        for position, block in enumerate(message.content):
            where = f"messages[{number}].content[{position}]"
            if block.type == "text":
                text.append(block.text or "")
            elif block.type == "tool_use" and message.role == "assistant":
                if not block.id or not block.name:
                    raise bad_request(f"{where} is a tool_use block without id and name")
                calls.append(template_tool_call(block.id, block.name, block.input or {}))
            elif block.type == "tool_result" and message.role == "user":
                if not block.tool_use_id:
                    raise bad_request(f"{where} is a tool_result block without tool_use_id")
                results.append(
                    {"role": "tool", "tool_call_id": block.tool_use_id, "content": _result_text(block, where)}
                )
            elif block.type not in ("thinking", "redacted_thinking") or message.role != "assistant":
                raise bad_request(
                    f"{where} is a {block.type} block in a {message.role} message; this server takes text, "
                    "tool_use (assistant), tool_result (user) and thinking (assistant) blocks"
                )
        messages += results
        if text or calls or not results:
            item: dict[str, Any] = {"role": message.role, "content": "".join(text)}
            if calls:
                item["tool_calls"] = calls
            messages.append(item)
    return messages


def _tool_choice(data: CountTokensRequest) -> ToolChoice:
    choice = data.tool_choice
    if choice is None:
        return ToolChoice()
    if choice.type != "none" and not data.tools:
        raise bad_request(f"tool_choice {choice.type!r} needs tools")
    parallel = not choice.disable_parallel_tool_use
    if choice.type == "tool":
        if not choice.name:
            raise bad_request("tool_choice of type 'tool' needs the tool's name")
        return ToolChoice("auto", choice.name, parallel)
    return ToolChoice(_TOOL_CHOICE_MODES[choice.type], None, parallel)


def _base_request(data: CountTokensRequest) -> GenerationRequest:
    tools = [template_tool(tool.name, tool.input_schema, tool.description) for tool in data.tools or ()]
    thinking = data.thinking is not None and data.thinking.type != "disabled"
    return GenerationRequest(
        messages=conversation_of(data),
        tools=tools or None,
        tool_choice=_tool_choice(data),
        template_options={"enable_thinking": True} if thinking else None,
        model=data.model,
    )


# Anthropic's defaults, for what neither the request nor the model's defaults set.
ANTHROPIC_SAMPLING = SamplingParams(temperature=1.0)


def generation_request(data: MessagesRequest) -> GenerationRequest:
    for name in ("container", "mcp_servers", "context_management"):
        if getattr(data, name) is not None:
            raise bad_request(f"{name} is not supported by this server")
    sampling, given = client_sampling(
        ANTHROPIC_SAMPLING, temperature=data.temperature, top_p=data.top_p, top_k=data.top_k
    )
    return replace(
        _base_request(data),
        max_tokens=data.max_tokens,
        sampling=sampling,
        sampling_given=given,
        stop=tuple(data.stop_sequences or ()),
    )


# -- the message ---------------------------------------------------------------------------------


def _stop(generation: Generation, called: bool) -> tuple[StopReason, str | None]:
    completion = generation.completion()
    if completion.cut_short:
        return "max_tokens", None
    if called:
        return "tool_use", None
    if completion.stop_sequence is not None:
        return "stop_sequence", completion.stop_sequence
    return "end_turn", None


def _usage(generation: Generation) -> MessageUsage:
    """Anthropic counts the prompt tokens read from the cache apart from the input tokens."""
    usage, cached = generation.completion().usage, generation.cached_prompt_tokens
    return MessageUsage(usage.prompt_tokens - cached, usage.completion_tokens, cache_read_input_tokens=cached)


# -- routes --------------------------------------------------------------------------------------


def _errors(*statuses: int) -> dict[int, Any]:
    return error_responses(AnthropicError, *statuses)


@generation_post(
    PATH,
    MessagesRequest,
    summary="Anthropic Messages API: create a message",
    answer=(MessageResponse, "The message; with stream: true, Anthropic's server-sent events instead"),
    error_body=AnthropicError,
    stream=(EVENT_STREAM, STREAM_EVENTS, "With stream: true, each event is one of these"),
)
async def create_message(
    data: MessagesRequest, caller: NamedDependency[Caller], generations: NamedDependency[GenerationService]
) -> MessageResponse | Stream:
    generation = await generations.start(caller, generation_request(data))
    message_id = f"msg_{uuid.uuid4().hex}"
    if data.stream:
        return _stream(message_id, generation)
    await generation.complete()
    builder = ContentBuilder()
    builder.feed(generation.turn_events())
    builder.finish()
    reason, sequence = _stop(generation, builder.called)
    return MessageResponse(message_id, generation.model_name, builder.blocks(), reason, sequence, _usage(generation))


def _stream(message_id: str, generation: Generation) -> Stream:
    async def events() -> AsyncIterator[bytes]:
        prompt_tokens = generation.prompt_tokens
        opening = MessageResponse(message_id, generation.model_name, [], None, None, MessageUsage(prompt_tokens, 0))
        yield encode_event(MessageStart(opening))
        yield encode_event(Ping())
        builder = ContentBuilder()
        async for chunk in generation.turn():
            for event in builder.feed(chunk.events):
                yield encode_event(event)
        for event in builder.finish():
            yield encode_event(event)
        reason, sequence = _stop(generation, builder.called)
        usage = _usage(generation)
        final = DeltaUsage(usage.output_tokens, usage.input_tokens, usage.cache_read_input_tokens)
        yield encode_event(MessageDelta(StopDelta(reason, sequence), final))
        yield encode_event(MessageStop())

    def failed(error: ApiError) -> list[bytes]:  # in-band, as Anthropic's streams report a failure
        return [encode_event(error_body(error))]

    return streamed(events(), on_failure=failed)


@json_post(
    f"{PATH}/count_tokens",
    CountTokensRequest,
    opt={"action": GENERATE},
    status_code=200,
    summary="Anthropic Messages API: count a request's input tokens",
    responses=_errors(400, 401, 403, 404, 413, 415, 503),
)
async def count_tokens(
    data: CountTokensRequest, caller: NamedDependency[Caller], generations: NamedDependency[GenerationService]
) -> TokenCount:
    return TokenCount(await generations.count_prompt_tokens(caller, _base_request(data)))


def messages_router() -> Router:
    return Router(
        "/",
        route_handlers=[create_message, count_tokens],
        exception_handlers={Exception: exception_handler(error_body)},
    )
