"""An assistant's turn as Responses output items, built as it streams.

``OutputBuilder`` is fed the turn's events (content, reasoning, tool calls) and answers with the
stream events that announce them: an item is added, its part is added, text deltas follow, and the
item is done when the next one begins or the turn ends. The items it built are the response's
``output``, streamed or not.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Literal

from forgellm import ContentDelta, ReasoningDelta, TokenLogprob, ToolCallArguments, ToolCallStart, TurnEvent
from forgellm.plugins.responses.protocol import (
    ArgumentsDeltaEvent,
    ArgumentsDoneEvent,
    ContentPartEvent,
    FunctionCallItem,
    MessageItem,
    OutputItem,
    OutputItemEvent,
    OutputText,
    ReasoningItem,
    ReasoningText,
    StreamEvent,
    TextDeltaEvent,
    TextDoneEvent,
)

ItemStatus = Literal["completed", "incomplete"]


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def logprob_entries(logprobs: Sequence[TokenLogprob]) -> list[dict[str, object]]:
    """Tokens' logprobs as output_text parts carry them."""
    return [
        {
            "token": entry.token,
            "logprob": entry.logprob,
            "bytes": list(entry.token_bytes),
            "top_logprobs": [{"token": t, "logprob": v, "bytes": list(raw)} for t, raw, v in entry.top],
        }
        for entry in logprobs
    ]


class OutputBuilder:
    def __init__(self) -> None:
        self.items: list[OutputItem] = []
        self._open: OutputItem | None = None
        self._text = ""  # the open message's or reasoning item's text so far
        self._logprobs: list[dict[str, object]] = []

    def feed(self, events: list[TurnEvent], logprobs: Sequence[TokenLogprob] = ()) -> list[StreamEvent]:
        """The stream events for these turn events; logprobs (of the step's tokens) travel with its first text."""
        out: list[StreamEvent] = []
        pending = logprob_entries(logprobs)
        for event in events:
            if isinstance(event, ContentDelta):
                if not isinstance(self._open, MessageItem):
                    out += self._close("completed") + self._open_message()
                out.append(self._text_delta("response.output_text.delta", event.text, pending))
                self._logprobs += pending
                pending = []
            elif isinstance(event, ReasoningDelta):
                if not isinstance(self._open, ReasoningItem):
                    out += self._close("completed") + self._open_reasoning()
                out.append(self._text_delta("response.reasoning_text.delta", event.text, None))
            elif isinstance(event, ToolCallStart):
                out += self._close("completed")
                item = FunctionCallItem(new_id("fc"), event.id, event.name, "", "in_progress")
                out.append(self._added(item, FunctionCallItem(item.id, item.call_id, item.name, "", "in_progress")))
            elif isinstance(event, ToolCallArguments) and isinstance(self._open, FunctionCallItem):
                self._open.arguments += event.text
                out.append(
                    ArgumentsDeltaEvent(
                        sequence_number=0, item_id=self._open.id, output_index=self._index, delta=event.text
                    )
                )
        self._logprobs += pending  # a step whose text is held back: its logprobs go with the message
        return out

    def finish(self, status: ItemStatus) -> list[StreamEvent]:
        """The events that close the last item; status "incomplete" when the generation hit its length."""
        return self._close(status)

    @property
    def _index(self) -> int:
        return len(self.items) - 1

    def _added(self, item: OutputItem, announced: OutputItem) -> OutputItemEvent:
        self.items.append(item)
        self._open, self._text = item, ""
        return OutputItemEvent(
            type="response.output_item.added", sequence_number=0, output_index=self._index, item=announced
        )

    def _open_message(self) -> list[StreamEvent]:
        item = MessageItem(new_id("msg"), "in_progress", [])
        return [
            self._added(item, MessageItem(item.id, "in_progress", [])),
            self._part_event("response.content_part.added", OutputText("")),
        ]

    def _open_reasoning(self) -> list[StreamEvent]:
        item = ReasoningItem(new_id("rs"), [], status="in_progress")
        return [
            self._added(item, ReasoningItem(item.id, [], status="in_progress")),
            self._part_event("response.content_part.added", ReasoningText("")),
        ]

    def _part_event(self, kind: str, part: OutputText | ReasoningText) -> ContentPartEvent:
        assert self._open is not None
        return ContentPartEvent(
            type=kind, sequence_number=0, item_id=self._open.id, output_index=self._index, content_index=0, part=part
        )

    def _text_delta(self, kind: str, text: str, logprobs: list[dict[str, object]] | None) -> TextDeltaEvent:
        assert self._open is not None
        self._text += text
        return TextDeltaEvent(
            type=kind,
            sequence_number=0,
            item_id=self._open.id,
            output_index=self._index,
            content_index=0,
            delta=text,
            logprobs=logprobs,
        )

    def _text_done(self, item: MessageItem | ReasoningItem, index: int, status: ItemStatus) -> list[StreamEvent]:
        """The events that end a message's or a reasoning item's text, its part then final."""
        part: OutputText | ReasoningText
        if isinstance(item, MessageItem):
            kind, logprobs = "output_text", self._logprobs
            part = OutputText(self._text, logprobs=logprobs)
            item.content = [part]
        else:
            kind, logprobs = "reasoning_text", None
            part = ReasoningText(self._text)
            item.content = [part]
        item.status = status
        return [
            TextDoneEvent(
                type=f"response.{kind}.done",
                sequence_number=0,
                item_id=item.id,
                output_index=index,
                content_index=0,
                text=self._text,
                logprobs=logprobs,
            ),
            ContentPartEvent(
                type="response.content_part.done",
                sequence_number=0,
                item_id=item.id,
                output_index=index,
                content_index=0,
                part=part,
            ),
        ]

    def _close(self, status: ItemStatus) -> list[StreamEvent]:
        item, self._open = self._open, None
        if item is None:
            return []
        index, item_id = self.items.index(item), item.id
        events: list[StreamEvent] = []
        if isinstance(item, MessageItem | ReasoningItem):
            events += self._text_done(item, index, status)
        else:
            item.status = status
            events.append(
                ArgumentsDoneEvent(
                    sequence_number=0, item_id=item_id, output_index=index, name=item.name, arguments=item.arguments
                )
            )
        events.append(
            OutputItemEvent(type="response.output_item.done", sequence_number=0, output_index=index, item=item)
        )
        return events
