"""Embedding requests batched on the engine thread: the inputs of every request waiting share forward passes.

A pass takes inputs from the waiting requests in turn (one from each, round and round), so a request of
two thousand inputs shares the thread with a request of one instead of making it wait for all of them;
a pass stops growing at PASS_TOKENS tokens, counted as the model computes them (every row padded to the
longest), so one pass never runs for long. A request's vectors go back once all its inputs are done.
"""

from __future__ import annotations

import concurrent.futures
import logging
from collections import deque
from dataclasses import dataclass, field

from forgellm.core.engine.backend import EmbeddingModel, LoadedModel

logger = logging.getLogger("forgellm.scheduler")

# Padded tokens per forward pass. On a 2-core CPU, all-MiniLM-L6-v2 embedded short sentences as fast in
# passes of 16 as of 64 (300 to 1,300 tokens) and a third slower in passes of 128, whose activations
# outgrow the caches; through HTTP at concurrency 8, passes of 1,024 tokens came out slower than 400
# (benchmarks/README.md). A pass of 512 takes about 0.1 s there, so a short request waits little.
PASS_TOKENS = 512


@dataclass(eq=False)
class EmbeddingWork:
    """One request's inputs (token ids, each within the model's window), and where its vectors go."""

    inputs: list[list[int]]
    future: concurrent.futures.Future[list[list[float]]] = field(default_factory=concurrent.futures.Future)
    vectors: dict[int, list[float]] = field(default_factory=dict)
    next_input: int = 0


class EmbeddingBatch:
    """The engine thread's waiting embedding requests, and the forward passes that serve them."""

    def __init__(self, pass_tokens: int = PASS_TOKENS) -> None:
        self._pass_tokens = pass_tokens
        self._waiting: deque[EmbeddingWork] = deque()

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, work: EmbeddingWork) -> None:
        self._waiting.append(work)

    def fail_all(self, message: str) -> None:
        for work in self._waiting:
            _settle(work, error=RuntimeError(message))
        self._waiting.clear()

    def run_pass(self, model: LoadedModel | None) -> None:
        """Embed the next pass's inputs; a request whose inputs are all done gets its vectors."""
        self._waiting = deque(work for work in self._waiting if not work.future.cancelled())
        if not self._waiting:
            return
        if not isinstance(model, EmbeddingModel):
            self.fail_all("no embedding model loaded")
            return
        chosen = self._next_pass()
        try:
            vectors = model.embed([work.inputs[index] for work, index in chosen])
        except Exception as exc:  # the requests in this pass fail; the thread and the others go on
            logger.exception("an embedding pass of %d inputs failed", len(chosen))
            for work in {work for work, _ in chosen}:
                self._waiting.remove(work)
                _settle(work, error=exc)
            return
        for (work, index), vector in zip(chosen, vectors, strict=True):
            work.vectors[index] = vector
        for work in [work for work in self._waiting if len(work.vectors) == len(work.inputs)]:
            self._waiting.remove(work)
            _settle(work, result=[work.vectors[index] for index in range(len(work.inputs))])

    def _next_pass(self) -> list[tuple[EmbeddingWork, int]]:
        chosen: list[tuple[EmbeddingWork, int]] = []
        longest = 0
        while True:
            took = False
            for work in self._waiting:
                if work.next_input == len(work.inputs):
                    continue
                length = len(work.inputs[work.next_input])
                padded = max(longest, length) * (len(chosen) + 1)
                if chosen and padded > self._pass_tokens:
                    return chosen
                chosen.append((work, work.next_input))
                work.next_input += 1
                longest = max(longest, length)
                took = True
            if not took:
                return chosen


def _settle(work: EmbeddingWork, result: list[list[float]] | None = None, error: BaseException | None = None) -> None:
    if work.future.done():  # cancelled meanwhile: its client left
        return
    try:
        if error is not None:
            work.future.set_exception(error)
        else:
            work.future.set_result(result or [])
    except concurrent.futures.InvalidStateError:
        pass  # cancelled between the check and now
