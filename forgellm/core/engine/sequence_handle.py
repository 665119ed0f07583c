"""The asyncio side of one generation: its text as it arrives, its usage, and how it ended."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from forgellm.core.engine.generation import (
    Completion,
    Delta,
    DraftTokens,
    GenerationJob,
    TokenLogprob,
    TokenOutput,
    Usage,
)
from forgellm.core.errors import ApiError, service_unavailable

if TYPE_CHECKING:
    from forgellm.core.engine.scheduler import Scheduler


class SequenceHandle:
    """The asyncio side of one generation: its text as it arrives, and how it ended."""

    def __init__(self, seq_id: int, job: GenerationJob, scheduler: Scheduler) -> None:
        self.seq_id = seq_id
        self.job = job
        self._scheduler = scheduler
        self.completion_tokens = 0
        self._drafts: dict[str, tuple[int, int]] = {}  # draft source: (drafted, accepted)
        self.cached_prompt_tokens = 0  # prompt tokens whose KV the engine reused instead of computing
        self.finish_reason: str | None = None
        self.stop_sequence: str | None = None  # the stop string that ended it, if one did
        self.error: str | None = None
        self.error_status = 500
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self._pending: list[str] = []
        self._pending_logprobs: list[TokenLogprob] = []
        self._text: list[str] = []
        self.logprobs: list[TokenLogprob] = []  # one per generated token, when the job asked for them
        self._arrived = asyncio.Event()
        self._finished = asyncio.Event()

    @property
    def done(self) -> bool:
        return self._finished.is_set()

    @property
    def usage(self) -> Usage:
        drafts = tuple(DraftTokens(source, *counts) for source, counts in self._drafts.items())
        return Usage(len(self.job.prompt_tokens), self.completion_tokens, drafts)

    def _receive(self, output: TokenOutput) -> None:
        for count in output.drafts:
            drafted, accepted = self._drafts.get(count.source, (0, 0))
            self._drafts[count.source] = (drafted + count.drafted, accepted + count.accepted)
        if output.error is not None:
            self.error, self.error_status = output.error, output.error_status
        else:
            self.completion_tokens += 1
            if self.first_token_at is None:
                self.first_token_at = time.perf_counter()
        if output.text:
            self._pending.append(output.text)
            self._text.append(output.text)
        if output.logprob is not None:
            self._pending_logprobs.append(output.logprob)
            self.logprobs.append(output.logprob)
        if output.finish_reason is not None:
            self.finish_reason = output.finish_reason
            self.stop_sequence = output.stop_sequence
        if output.error is not None or output.finish_reason is not None:
            self.finished_at = time.perf_counter()
            self._finished.set()
        self._arrived.set()

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            if self.error_status == 503:
                raise service_unavailable(self.error, retry_after=5)
            raise ApiError(self.error_status, f"Generation failed: {self.error}", code="generation_failed")

    async def chunks(self) -> AsyncIterator[Delta]:
        """Text as it is generated, one chunk per engine step; raises ApiError if the backend fails."""
        while True:
            await self._arrived.wait()
            self._arrived.clear()
            if self._pending or self._pending_logprobs:
                delta = Delta("".join(self._pending), tuple(self._pending_logprobs))
                self._pending.clear()
                self._pending_logprobs.clear()
                yield delta
            if self.done:
                self._raise_if_failed()
                return

    async def wait(self) -> None:
        """Wait for the end without waking at every step."""
        await self._finished.wait()

    def completion(self) -> Completion:
        self._raise_if_failed()
        end = self.finished_at or time.perf_counter()
        return Completion(
            text="".join(self._text),
            finish_reason=self.finish_reason or "length",
            usage=self.usage,
            generation_time=end - self.submitted_at,
            time_to_first_token=(self.first_token_at or end) - self.submitted_at,
            stop_sequence=self.stop_sequence,
        )

    def cancel(self) -> None:
        """Stop generating (the client left or timed out); its batch slot frees at the next step."""
        if not self.done:
            self._scheduler.cancel(self.seq_id)
