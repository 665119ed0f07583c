"""An assistant's turn as Messages content blocks, built as it streams.

``ContentBuilder`` is fed the turn's events (content, reasoning, tool calls) and answers with the
stream events that announce them: a block starts, deltas follow, and it stops when the next one
begins or the turn ends. The blocks it built are the message's ``content``, streamed or not.
"""

from __future__ import annotations

import json
from typing import Any

import partial_json_parser

from forgellm import ContentDelta, ReasoningDelta, ToolCallArguments, ToolCallStart, TurnEvent
from forgellm.plugins.anthropic.protocol import (
    ContentBlockDelta,
    ContentBlockStart,
    ContentBlockStop,
    InputJsonDelta,
    OutputBlock,
    StreamEvent,
    TextBlock,
    TextDelta,
    ThinkingBlock,
    ThinkingDelta,
    ToolUseBlock,
)


def _partial_object(text: str) -> Any:
    """The object a JSON text cut short begins, or None when it begins none."""
    try:
        return partial_json_parser.loads(text)
    except (ValueError, RecursionError):  # its JSONDecodeError is a ValueError
        return None


def tool_use_id(call_id: str) -> str:
    """Anthropic's id style for a call the pipeline named ``call_...``."""
    return "toolu_" + call_id.removeprefix("call_")


class ContentBuilder:
    def __init__(self) -> None:
        self._blocks: list[OutputBlock] = []
        self._arguments: dict[int, str] = {}  # a tool_use block's input, as the JSON text streamed so far
        self._open = False

    @property
    def called(self) -> bool:
        return any(isinstance(block, ToolUseBlock) for block in self._blocks)

    def feed(self, events: list[TurnEvent]) -> list[StreamEvent]:
        out: list[StreamEvent] = []
        for event in events:
            current = self._blocks[-1] if self._open else None
            if isinstance(event, ContentDelta):
                if not event.text:
                    continue
                if not isinstance(current, TextBlock):
                    out += self._start(TextBlock(""), TextBlock(""))
                block = self._blocks[-1]
                assert isinstance(block, TextBlock)
                block.text += event.text
                out.append(ContentBlockDelta(self._index, TextDelta(event.text)))
            elif isinstance(event, ReasoningDelta):
                if not isinstance(current, ThinkingBlock):
                    out += self._start(ThinkingBlock(""), ThinkingBlock(""))
                thinking = self._blocks[-1]
                assert isinstance(thinking, ThinkingBlock)
                thinking.thinking += event.text
                out.append(ContentBlockDelta(self._index, ThinkingDelta(event.text)))
            elif isinstance(event, ToolCallStart):
                call_id = tool_use_id(event.id)
                out += self._start(ToolUseBlock(call_id, event.name, {}), ToolUseBlock(call_id, event.name, {}))
                self._arguments[self._index] = ""
            elif isinstance(event, ToolCallArguments) and isinstance(current, ToolUseBlock):
                self._arguments[self._index] += event.text
                out.append(ContentBlockDelta(self._index, InputJsonDelta(event.text)))
        return out

    def finish(self) -> list[StreamEvent]:
        return self._stop()

    def blocks(self) -> list[OutputBlock]:
        """The message's content. A call cut short by max_tokens has the input its arguments so far make (their
        open strings and objects closed); one whose arguments are no JSON object at all (a model may write one)
        is kept as text, so nothing it said is lost."""
        content: list[OutputBlock] = []
        for index, block in enumerate(self._blocks):
            if isinstance(block, ToolUseBlock):
                arguments = self._arguments[index]
                try:
                    parsed: Any = json.loads(arguments or "{}")
                except ValueError:
                    parsed = _partial_object(arguments)
                if not isinstance(parsed, dict):
                    content.append(TextBlock(arguments))
                    continue
                block = ToolUseBlock(block.id, block.name, parsed)
            content.append(block)
        return content

    @property
    def _index(self) -> int:
        return len(self._blocks) - 1

    def _start(self, block: OutputBlock, announced: OutputBlock) -> list[StreamEvent]:
        events = self._stop()
        self._blocks.append(block)
        self._open = True
        return [*events, ContentBlockStart(self._index, announced)]

    def _stop(self) -> list[StreamEvent]:
        if not self._open:
            return []
        self._open = False
        return [ContentBlockStop(self._index)]
