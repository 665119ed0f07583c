"""An assistant's turn, split from the model's text into content, reasoning and tool calls, as it streams.

Every API dialect that speaks tools and reasoning (OpenAI's chat completions, the Responses and
Messages plugins) reads a generation through a ``TurnSplitter``: it is fed the text as generated and
gives back events (content, reasoning, a tool call beginning with its name, argument fragments),
holding back only what might be the start of a marker. The markers are the model's own
(``OutputFormat``, inferred by the backend from the chat template): ``<think>``/``</think>``, and
the tool-call markers, whose text the model's parser turns into a name and arguments.

A forced tool call (tool_choice ``required`` or a named function) is generated under a JSON grammar
(``forced_call_schema``), so the whole text is the call (or, with parallel calls, a list of them):
``TurnSplitter(forced=True)`` streams each call's name first, then its arguments as they are generated.
A forced call is always a call: cut short by max_tokens, it is the call with the arguments generated so far.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from forgellm.core.engine.backend import OutputFormat

# For templates that do not render tools themselves: how the tools are described to the model.
TOOL_PROMPT = (
    'You may call these functions. To call one, answer with {start}{{"name": <function name>, '
    '"arguments": <arguments as a JSON object>}}{end}, one per call, and nothing else.\nFunctions:\n{functions}'
)


# How each forced call begins, under the compact JSON grammar (after the list's "[" or a "," between calls):
# its name, then its arguments; and the start of one cut off inside its name.
_FORCED_OPENING = re.compile(r'[\[,]?\{"name":"((?:[^"\\]|\\.)*)","arguments":')
_FORCED_NAME_START = '{"name":"'
_JSON = json.JSONDecoder()


def template_tool(name: str, parameters: dict[str, Any] | None, description: str | None = None) -> dict[str, Any]:
    """A function tool as the pipeline and chat templates take it (OpenAI's function format); no parameter schema
    is an object of any shape."""
    function: dict[str, Any] = {"name": name, "parameters": parameters or {"type": "object"}}
    if description:
        function["description"] = description
    return {"type": "function", "function": function}


def template_tool_call(call_id: str, name: str, arguments: Any) -> dict[str, Any]:
    """An earlier call, as an assistant message's ``tool_calls`` holds it for chat templates (arguments as an
    object, as templates expect)."""
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def tool_prompt(tools: list[dict[str, Any]], output_format: OutputFormat) -> str:
    """The system text that describes the tools to a model whose chat template does not."""
    start, end = output_format.tool_call or ("", "")
    functions = "\n".join(json.dumps(tool["function"], ensure_ascii=False) for tool in tools)
    return TOOL_PROMPT.format(start=start, end=end, functions=functions)


def forced_call_schema(tools: list[dict[str, Any]], name: str | None, parallel: bool) -> dict[str, Any]:
    """The JSON schema of a call to the named function (or to any of the tools): {"name", "arguments"};
    with parallel calls allowed and no name given, a list of one or more such calls."""
    chosen = [tool["function"] for tool in tools if name is None or tool["function"]["name"] == name]
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"const": function["name"]},
                "arguments": function.get("parameters") or {"type": "object"},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for function in chosen
    ]
    call = calls[0] if len(calls) == 1 else {"anyOf": calls}
    if parallel and name is None:
        return {"type": "array", "items": call, "minItems": 1}
    return call


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as text


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True)
class ToolCallStart:
    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ToolCallArguments:
    index: int
    text: str


TurnEvent = ContentDelta | ReasoningDelta | ToolCallStart | ToolCallArguments


@dataclass
class AssistantTurn:
    """A whole turn, as the events of a splitter add up."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)

    def add(self, events: list[TurnEvent]) -> None:
        for event in events:
            if isinstance(event, ContentDelta):
                self.content += event.text
            elif isinstance(event, ReasoningDelta):
                self.reasoning += event.text
            elif isinstance(event, ToolCallStart):
                self.tool_calls.append(ToolCall(event.id, event.name, ""))
            else:
                self.tool_calls[event.index].arguments += event.text


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class TurnSplitter:
    """Splits streamed text into turn events. feed(text) as it arrives, then finish() once it ends."""

    def __init__(
        self,
        output_format: OutputFormat,
        *,
        tools: list[dict[str, Any]] | None = None,
        forced: bool = False,
        in_reasoning: bool = False,
    ) -> None:
        """``in_reasoning``: the prompt ended inside a think block, so the text starts as reasoning."""
        self._format = output_format
        self._tools = tools
        self._forced = forced
        self._calls = 0
        self._held = ""
        self._in_call = False
        self._call_text = ""
        self._forced_text = ""
        self._forced_at = 0  # where the next forced call begins in the forced text
        self._streamed_call: int | None = None  # the index of a forced call whose arguments are streaming
        self._arguments_at = 0  # where that call's arguments begin in the forced text
        self._streamed_upto = 0  # how much of the forced text has gone out as argument fragments
        self._think = output_format.think
        self._in_think = in_reasoning and self._think is not None
        self._tool_markers = output_format.tool_call if tools else None

    def feed(self, text: str) -> list[TurnEvent]:
        if self._forced:
            return self._feed_forced(text)
        self._held += text
        events: list[TurnEvent] = []
        while self._held:
            marker = self._next_marker()
            index = self._held.find(marker) if marker is not None else -1
            if marker is None or index < 0:
                keep = _partial_suffix(self._held, marker)
                ready, self._held = self._held[: len(self._held) - keep], self._held[len(self._held) - keep :]
                events += self._emit(ready)
                break
            events += self._emit(self._held[:index])
            self._held = self._held[index + len(marker) :]
            events += self._cross(marker)
        return events

    def finish(self) -> list[TurnEvent]:
        """The events the end of the text completes: held-back text, an unclosed call, a forced call."""
        if self._forced:
            return self._finish_forced()
        events = self._emit(self._held)
        self._held = ""
        if self._in_call:  # the model ended inside a call: parse what it wrote
            events += self._call_events(self._call_text)
            self._in_call, self._call_text = False, ""
        return events

    # -- markers ---------------------------------------------------------------------------------
    def _next_marker(self) -> str | None:
        if self._in_think:
            return self._think[1] if self._think else None
        if self._in_call:
            return self._tool_markers[1] if self._tool_markers else None
        # Outside both: whichever opening marker comes first in the held text.
        candidates = [
            m
            for m in (self._think[0] if self._think else None, self._tool_markers[0] if self._tool_markers else None)
            if m
        ]
        present = [m for m in candidates if m in self._held]
        if present:
            return min(present, key=self._held.find)
        return max(candidates, key=lambda m: _partial_suffix(self._held, m)) if candidates else None

    def _cross(self, marker: str) -> list[TurnEvent]:
        if self._think and marker == self._think[0] and not self._in_call:
            self._in_think = True
        elif self._think and marker == self._think[1] and self._in_think:
            self._in_think = False
        elif self._tool_markers and marker == self._tool_markers[0]:
            self._in_call, self._call_text = True, ""
        elif self._tool_markers and marker == self._tool_markers[1] and self._in_call:
            text, self._in_call, self._call_text = self._call_text, False, ""
            return self._call_events(text)
        return []

    def _emit(self, text: str) -> list[TurnEvent]:
        if not text:
            return []
        if self._in_call:
            self._call_text += text
            return []
        return [ReasoningDelta(text) if self._in_think else ContentDelta(text)]

    # -- calls -----------------------------------------------------------------------------------
    def _call_events(self, text: str) -> list[TurnEvent]:
        parse = self._format.parse_tool_call
        try:
            parsed = parse(text, self._tools) if parse else json.loads(text)
            name, arguments = str(parsed["name"]), parsed.get("arguments", {})
        except (ValueError, KeyError, TypeError):
            return [ContentDelta(text)]  # not a call after all: the model's own words
        return self._call(name, arguments if isinstance(arguments, str) else json.dumps(arguments))

    def _call(self, name: str, arguments: str) -> list[TurnEvent]:
        index, self._calls = self._calls, self._calls + 1
        return [ToolCallStart(index, new_call_id(), name), ToolCallArguments(index, arguments)]

    def _feed_forced(self, text: str) -> list[TurnEvent]:
        """Forced calls stream: each call's name once the grammar's fixed opening is complete, then its arguments
        as they come; a call ends where its arguments' JSON value does."""
        self._forced_text += text
        events: list[TurnEvent] = []
        while True:
            if self._streamed_call is None:
                opening = _FORCED_OPENING.match(self._forced_text, self._forced_at)
                if opening is None:
                    return events
                index, self._calls = self._calls, self._calls + 1
                self._streamed_call = index
                self._arguments_at = self._streamed_upto = opening.end()
                events.append(ToolCallStart(index, new_call_id(), json.loads(f'"{opening.group(1)}"')))
            try:
                _, end = _JSON.raw_decode(self._forced_text, self._arguments_at)
            except ValueError:  # not complete yet: all of it is arguments so far
                events += self._stream_arguments(len(self._forced_text))
                return events
            events += self._stream_arguments(end)
            self._streamed_call = None
            self._forced_at = end + 1  # past the call's closing brace

    def _stream_arguments(self, upto: int) -> list[TurnEvent]:
        if self._streamed_call is None or upto <= self._streamed_upto:
            return []
        fragment = self._forced_text[self._streamed_upto : upto]
        self._streamed_upto = upto
        return [ToolCallArguments(self._streamed_call, fragment)]

    def _finish_forced(self) -> list[TurnEvent]:
        """A forced generation cut short (max_tokens, a timeout) is still the call it was making: with the
        arguments generated so far, or, cut inside the name, the one tool that name can still be."""
        if self._streamed_call is not None or self._calls:
            return []
        rest = self._forced_text[self._forced_at :].lstrip("[,")
        if _FORCED_NAME_START.startswith(rest):
            begun = ""
        elif rest.startswith(_FORCED_NAME_START):
            begun = rest[len(_FORCED_NAME_START) :].partition('"')[0]
        else:
            return []
        names = [tool["function"]["name"] for tool in self._tools or ()]
        candidates = [name for name in names if json.dumps(name)[1:-1].startswith(begun)]
        return self._call(candidates[0], "") if len(candidates) == 1 else []


def _partial_suffix(text: str, marker: str | None) -> int:
    """The length of the longest end of text that begins marker (held back: the marker may be arriving)."""
    if not marker:
        return 0
    for length in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:length]):
            return length
    return 0
