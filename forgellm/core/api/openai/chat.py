"""``POST /v1/chat/completions``: a conversation in OpenAI's chat format, through the pipeline, back as a
completion whose messages are read as assistant turns (content, reasoning, tool calls)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from litestar.response import Stream

from forgellm.core.api.assistant_turn import (
    AssistantTurn,
    ContentDelta,
    ReasoningDelta,
    ToolCallArguments,
    ToolCallStart,
    TurnEvent,
    TurnSplitter,
    template_tool,
    template_tool_call,
)
from forgellm.core.api.generation import Generation
from forgellm.core.api.openai.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatMessage,
    FunctionCall,
    FunctionCallDelta,
    NamedToolChoice,
    Prediction,
    ToolCallDelta,
    ToolCallResponse,
    UsageBody,
)
from forgellm.core.api.openai.serving import (
    choice_requests,
    finish_reason,
    include_usage,
    refuse_unsupported,
    sse_events,
    token_body,
    usage_of,
)
from forgellm.core.api.pipeline import GenerationService
from forgellm.core.api.request import Caller, GenerationRequest, ToolChoice
from forgellm.core.api.template_variables import template_variables
from forgellm.core.engine.generation import Constraint, Delta, TokenLogprob
from forgellm.core.errors import bad_request


async def serve_chat(
    data: ChatCompletionRequest, caller: Caller, generations: GenerationService
) -> ChatCompletionResponse | Stream:
    started = await generations.start_group(caller, chat_requests(data))
    response_id, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), started.model_name

    def chunk(choices: list[ChatChunkChoice], usage: UsageBody | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(response_id, "chat.completion.chunk", created, model, choices, usage)

    if data.stream:
        streams = [ChatStream(index, generation, data.logprobs) for index, generation in enumerate(started)]

        def on_delta(index: int, delta: Delta, first: bool) -> list[ChatCompletionChunk]:
            return [chunk([choice]) for choice in streams[index].choices(delta, first)]

        def on_end(index: int, generation: Generation) -> list[ChatCompletionChunk]:
            return [chunk([choice]) for choice in streams[index].end()]

        usage = (lambda: chunk([], usage_of(started, 1))) if include_usage(data) else None
        return sse_events(started, on_delta, on_end, usage)
    await started.complete()
    choices = []
    for index, generation in enumerate(started):
        turn = AssistantTurn()
        turn.add(generation.turn_events())
        message = AssistantMessage(
            role="assistant",
            content=turn.content if turn.content or not turn.tool_calls else None,
            tool_calls=[ToolCallResponse(c.id, FunctionCall(c.name, c.arguments)) for c in turn.tool_calls] or None,
            reasoning_content=turn.reasoning or None,
        )
        logprobs = _chat_logprobs(generation.logprobs, data.logprobs)
        choices.append(ChatChoice(index, message, finish_reason(generation, bool(turn.tool_calls)), logprobs))
    return ChatCompletionResponse(
        id=response_id, created=created, model=model, choices=choices, usage=usage_of(started, 1)
    )


# -- the request ----------------------------------------------------------------------------------


def _template_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """The conversation as chat templates take it (tool calls' arguments as objects, as templates expect)."""
    rendered = []
    for number, message in enumerate(messages):
        parts = message.content if isinstance(message.content, list) else []
        for part in parts:
            if part.type != "text":
                raise bad_request(
                    f"Message {number} has a {part.type} part; only text content is supported by this server"
                )
        text = message.content if isinstance(message.content, str) else "".join(p.text or "" for p in parts)
        item: dict[str, Any] = {
            "role": "system" if message.role == "developer" else message.role,
            "content": text or message.refusal or "",
        }
        if message.tool_calls:
            item["tool_calls"] = [
                template_tool_call(call.id, call.function.name, _arguments(call.function.arguments, number))
                for call in message.tool_calls
            ]
        if message.role == "tool":
            if message.tool_call_id is None:
                raise bad_request(f"Message {number} is a tool result without a tool_call_id")
            item["tool_call_id"] = message.tool_call_id
        rendered.append(item)
    return rendered


def _arguments(text: str, number: int) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        raise bad_request(f"Message {number} has a tool call whose arguments are not JSON") from None


def _tool_choice(data: ChatCompletionRequest) -> ToolChoice:
    choice = data.tool_choice
    parallel = data.parallel_tool_calls is not False
    if isinstance(choice, NamedToolChoice):
        return ToolChoice("auto", choice.function.name, parallel)
    if choice is not None and not data.tools and choice != "none":
        raise bad_request(f"tool_choice {choice!r} needs tools")
    return ToolChoice(choice or "auto", None, parallel)


def _response_format(data: ChatCompletionRequest) -> Constraint | None:
    format = data.response_format
    if format is None or format.type == "text":
        return None
    if format.type == "json_object":
        return Constraint({"type": "object"})
    if format.json_schema is None or format.json_schema.schema is None:
        raise bad_request("response_format json_schema needs json_schema.schema")
    return Constraint(format.json_schema.schema)


def chat_requests(data: ChatCompletionRequest) -> list[GenerationRequest]:
    refuse_unsupported(
        {name: getattr(data, name) for name in ("audio", "web_search_options", "functions", "moderation")}
    )
    if data.function_call is not None:
        raise bad_request("function_call is not supported by this server; use tools and tool_choice")
    if data.modalities not in (None, ["text"]):
        raise bad_request('modalities: only ["text"] is supported by this server')
    if data.top_logprobs is not None and not data.logprobs:
        raise bad_request("top_logprobs needs logprobs: true")
    base = GenerationRequest(
        messages=_template_messages(data.messages),
        tools=[_function(tool) for tool in data.tools or ()] or None,
        tool_choice=_tool_choice(data),
        template_options=template_variables(data.chat_template_kwargs),
        max_tokens=data.max_completion_tokens if data.max_completion_tokens is not None else data.max_tokens,
        constraint=_response_format(data),
        logprobs=(data.top_logprobs or 0) if data.logprobs else None,
        prediction=_prediction_text(data.prediction),
    )
    return choice_requests(data, base)


def _prediction_text(prediction: Prediction | None) -> str | None:
    if prediction is None:
        return None
    if isinstance(prediction.content, str):
        return prediction.content
    if any(part.type != "text" for part in prediction.content):
        raise bad_request("prediction: content parts must be text")
    return "".join(part.text or "" for part in prediction.content)


def _function(tool: Any) -> dict[str, Any]:
    function = tool.function
    return template_tool(function.name, function.parameters, function.description)


# -- the answer -----------------------------------------------------------------------------------


def _chat_logprobs(logprobs: Sequence[TokenLogprob], asked: bool) -> ChatLogprobs | None:
    return ChatLogprobs([token_body(entry) for entry in logprobs]) if asked else None


@dataclass
class ChatStream:
    """One choice of a streamed chat completion: its text read as a turn, as OpenAI's deltas."""

    index: int
    generation: Generation
    logprobs: bool

    def __post_init__(self) -> None:
        self._splitter: TurnSplitter = self.generation.splitter()
        self._called = False

    def choices(self, delta: Delta, first: bool) -> list[ChatChunkChoice]:
        opening = [ChatChunkChoice(self.index, ChatDelta(role="assistant", content=""), None, None)] if first else []
        events = self._splitter.feed(delta.text)
        logprobs = _chat_logprobs(delta.logprobs, self.logprobs)
        if not events and logprobs is not None:
            events = [ContentDelta("")]  # tokens whose text is held back still carry their logprobs
        return opening + self._deltas(events, logprobs)

    def end(self) -> list[ChatChunkChoice]:
        deltas = self._deltas(self._splitter.finish(), None)
        reason = finish_reason(self.generation, self._called)
        return [*deltas, ChatChunkChoice(self.index, ChatDelta(), None, reason)]

    def _deltas(self, events: list[TurnEvent], logprobs: ChatLogprobs | None) -> list[ChatChunkChoice]:
        choices = []
        for number, item in enumerate(events):
            carried = logprobs if number == 0 else None
            choices.append(ChatChunkChoice(self.index, self._delta(item), carried, None))
        return choices

    def _delta(self, item: TurnEvent) -> ChatDelta:
        if isinstance(item, ContentDelta):
            return ChatDelta(content=item.text)
        if isinstance(item, ReasoningDelta):
            return ChatDelta(reasoning_content=item.text)
        self._called = True
        if isinstance(item, ToolCallStart):
            call = ToolCallDelta(item.index, item.id, "function", FunctionCallDelta(name=item.name, arguments=""))
            return ChatDelta(tool_calls=[call])
        assert isinstance(item, ToolCallArguments)
        return ChatDelta(tool_calls=[ToolCallDelta(item.index, function=FunctionCallDelta(arguments=item.text))])
