"""What the console charts: generations, tokens and time to first token, and the engine's load, in buckets.

A ring of ``BUCKET_SECONDS`` buckets over the last ``WINDOW_SECONDS``, fed by the after_generate hook
(tokens count when a generation ends) and by a sampler of the schedulers' gauges, so a page opened
late still shows the last minutes.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from forgellm import Usage

BUCKET_SECONDS = 5.0
WINDOW_SECONDS = 600.0
SHOWN_SECONDS = 300.0  # the charts' span: the last five minutes, quiet buckets included


@dataclass
class Bucket:
    start: float
    generations: int = 0
    tokens: int = 0
    ttft_ms: list[float] = field(default_factory=list)
    drafted: int = 0  # tokens speculative decoding drafted
    accepted: int = 0  # of them, those the model kept
    active: int = 0  # the most sequences in the batches, over the bucket's samples
    queued: int = 0

    def point(self) -> dict[str, Any]:
        return {
            "t": self.start,
            "generations": self.generations,
            "tokens_per_second": self.tokens / BUCKET_SECONDS,
            "ttft_ms": statistics.median(self.ttft_ms) if self.ttft_ms else None,
            "draft_acceptance": self.accepted / self.drafted if self.drafted else None,
            "active": self.active,
            "queued": self.queued,
        }


class LiveStats:
    def __init__(self) -> None:
        self._buckets: deque[Bucket] = deque(maxlen=int(WINDOW_SECONDS / BUCKET_SECONDS))

    def _current(self, now: float) -> Bucket:
        start = now - now % BUCKET_SECONDS
        if not self._buckets or self._buckets[-1].start < start:
            self._buckets.append(Bucket(start))
        return self._buckets[-1]

    def generation(self, usage: Usage, ttft_ms: float | None, now: float | None = None) -> None:
        bucket = self._current(time.time() if now is None else now)
        bucket.generations += 1
        bucket.tokens += usage.completion_tokens
        bucket.drafted += usage.drafted_tokens
        bucket.accepted += usage.accepted_draft_tokens
        if ttft_ms is not None:
            bucket.ttft_ms.append(ttft_ms)

    def sample(self, active: int, queued: int, now: float | None = None) -> None:
        bucket = self._current(time.time() if now is None else now)
        bucket.active, bucket.queued = max(bucket.active, active), max(bucket.queued, queued)

    def series(self, now: float | None = None) -> list[dict[str, Any]]:
        """One point per bucket over the last SHOWN_SECONDS, oldest first; a quiet bucket is a zero."""
        now = time.time() if now is None else now
        latest = now - now % BUCKET_SECONDS
        kept = {bucket.start: bucket for bucket in self._buckets}
        starts = [latest - BUCKET_SECONDS * n for n in range(int(SHOWN_SECONDS / BUCKET_SECONDS) - 1, -1, -1)]
        return [(kept.get(start) or Bucket(start)).point() for start in starts]
