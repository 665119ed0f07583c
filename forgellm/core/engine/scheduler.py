"""The scheduler: one resident model's engine thread, feeding that model's requests through one batched engine.

Requests enter a bounded queue from the asyncio side. The engine thread admits them
into the batch (a free row goes to the waiting sequence whose client holds fewest rows, so
one client's many sequences never make another's wait behind them), steps the engine,
matches stop strings, and hands each step's outputs back to the event loop in one call.
Model swaps run on the same thread, once the work already admitted has finished.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import queue
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterator

from forgellm.core.engine.backend import CacheStats, EmbeddingModel, Engine, LoadedModel
from forgellm.core.engine.commands import Add, Cancel, Command, Embed, ModelLoader, Stop, Swap
from forgellm.core.engine.embedding_batch import EmbeddingBatch, EmbeddingWork
from forgellm.core.engine.generation import GenerationJob, TokenOutput
from forgellm.core.engine.kv_admission import KvAdmission, reserved_bytes
from forgellm.core.engine.sequence_handle import SequenceHandle
from forgellm.core.engine.stop_strings import StopMatcher
from forgellm.core.errors import ApiError, service_unavailable

logger = logging.getLogger("forgellm.scheduler")


class _Sequence:
    """The engine thread's view of one generation."""

    __slots__ = ("seq_id", "job", "stops")

    def __init__(self, seq_id: int, job: GenerationJob) -> None:
        self.seq_id = seq_id
        self.job = job
        self.stops = StopMatcher(job.stop)


class Scheduler:
    """Admission control on the asyncio side, continuous batching on the engine thread."""

    def __init__(self, *, max_concurrency: int, max_queue: int, max_rows_per_client: int = 0) -> None:
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.max_rows_per_client = max_rows_per_client  # 0: none beyond the fair order
        self._inbox: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._handles: dict[int, SequenceHandle] = {}  # event-loop side only
        self._embeddings_in_flight: set[EmbeddingWork] = set()  # event-loop side only
        # Engine-thread state.
        self._model: LoadedModel | None = None
        self._engine: Engine | None = None
        self._release_thread: Callable[[], None] | None = None
        self._waiting: deque[_Sequence] = deque()
        self._running: dict[int, _Sequence] = {}
        self._embeddings = EmbeddingBatch()
        self._cached_prompt_tokens: dict[int, int] = {}  # admitted since the last post
        # Read from the event loop for health and metrics; plain ints are safe to share.
        self.steps = 0
        self.waiting_count = 0
        self.active_count = 0
        self.cache_bytes = 0  # the KV caches the engine holds, when it says (its cache_bytes())
        self.cache_stats = CacheStats()
        self.kv_reserved = 0  # what the running sequences may grow to (admission's count)
        self.kv_admission = KvAdmission()

    # -- event-loop side ------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="forgellm-engine", daemon=True)
        self._thread.start()

    async def stop(self, timeout: float | None = None) -> None:
        """Finish admitted work, free the model, and end the engine thread; after timeout seconds, give up on a
        thread that is stuck (in a load that never returns, say): it is a daemon, so the process still exits."""
        thread = self._thread
        if thread is None:
            return
        self._inbox.put(Stop())
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while thread.is_alive():
            if deadline is not None and loop.time() > deadline:
                logger.warning("the engine thread did not stop within %gs; exiting without it", timeout)
                break
            await asyncio.sleep(0.02)
        self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def in_flight(self) -> int:
        """Requests admitted and not yet finished: waiting or in the batch."""
        return len(self._handles) + len(self._embeddings_in_flight)

    def submit(self, job: GenerationJob) -> SequenceHandle:
        """Queue a generation, or refuse at once with 503 when the queue is full."""
        if len(self._handles) >= self.max_concurrency + self.max_queue:
            raise service_unavailable("Server is at capacity; retry shortly")
        refused = self.kv_admission.refusal(self._engine, job)
        if refused is not None:
            raise refused
        handle = SequenceHandle(next(self._ids), job, self)
        self._handles[handle.seq_id] = handle
        self._inbox.put(Add(handle.seq_id, job))
        return handle

    def submit_embedding(self, inputs: list[list[int]]) -> concurrent.futures.Future[list[list[float]]]:
        """Queue an embedding request's inputs (token ids); its future gets one vector per input. Cancelling the
        future drops the inputs not yet embedded. A full queue is a 503 at once."""
        if self.in_flight >= self.max_concurrency + self.max_queue:
            raise service_unavailable("Server is at capacity; retry shortly")
        work = EmbeddingWork(inputs)
        self._embeddings_in_flight.add(work)
        loop = self._loop
        if loop is not None:
            work.future.add_done_callback(lambda _: loop.call_soon_threadsafe(self._embeddings_in_flight.discard, work))
        self._inbox.put(Embed(work))
        return work.future

    def cancel(self, seq_id: int) -> None:
        if self._handles.pop(seq_id, None) is not None:
            self._inbox.put(Cancel(seq_id))

    def fail_in_flight(self, message: str) -> None:
        """End every request in flight with a 503 now, without waiting on the engine thread (the backend cannot
        generate any more); what the thread posts for them later is dropped."""
        handles, self._handles = self._handles, {}
        for handle in handles.values():
            handle._receive(TokenOutput(handle.seq_id, "", error=message, error_status=503))
        for work in list(self._embeddings_in_flight):
            with contextlib.suppress(concurrent.futures.InvalidStateError):  # the engine thread answered first
                work.future.set_exception(service_unavailable(message))

    def swap_model(self, load: ModelLoader) -> concurrent.futures.Future[LoadedModel | None]:
        """Replace the model once admitted work is done; load returns the new model, or None to unload."""
        future: concurrent.futures.Future[LoadedModel | None] = concurrent.futures.Future()
        self._inbox.put(Swap(load, future))
        return future

    def _deliver(self, outputs: list[TokenOutput], cached_prompt_tokens: dict[int, int]) -> None:
        for seq_id, cached in cached_prompt_tokens.items():
            handle = self._handles.get(seq_id)
            if handle is not None:
                handle.cached_prompt_tokens = cached
        for output in outputs:
            handle = self._handles.get(output.seq_id)
            if handle is None:
                continue  # cancelled while the step ran
            handle._receive(output)
            if handle.done:
                del self._handles[output.seq_id]

    # -- engine thread ---------------------------------------------------------------------
    def _run(self) -> None:
        swaps: deque[Swap] = deque()
        stopping = False
        while True:
            busy = bool(self._running or self._waiting or self._embeddings)
            for command in self._commands(block=not (busy or swaps or stopping)):
                if isinstance(command, Add):
                    self._waiting.append(_Sequence(command.seq_id, command.job))
                elif isinstance(command, Embed):
                    self._embeddings.add(command.work)
                elif isinstance(command, Cancel):
                    self._drop(command.seq_id)
                elif isinstance(command, Swap):
                    swaps.append(command)
                else:
                    stopping = True
            self._admit()
            if self._running:
                self._step()
            elif self._embeddings:
                self._embeddings.run_pass(self._model)
            elif swaps and not self._waiting:
                self._swap(swaps.popleft())
            elif stopping and not self._waiting:
                break
            self._update_counts()
        self._close_model()
        if self._release_thread is not None:
            self._release_thread()

    def _commands(self, block: bool) -> Iterator[Command]:
        if block:
            yield self._inbox.get()
        while True:
            try:
                yield self._inbox.get_nowait()
            except queue.Empty:
                return

    def _admit(self) -> None:
        while self._waiting and len(self._running) < self.max_concurrency:
            sequence = self._next_fair()
            if sequence is None:
                return  # every waiting client holds --max-rows-per-client rows
            if self._engine is None:
                self._post([TokenOutput(sequence.seq_id, "", error="no model loaded")])
                continue
            running = [s.job for s in self._running.values()]
            if not self.kv_admission.room(self._engine, running, sequence.job):
                if running:  # it waits, first in line, until finished sequences free their KV
                    self._waiting.appendleft(sequence)
                    return
                refusal = self.kv_admission.refusal(self._engine, sequence.job)
                message = refusal.message if refusal else "The memory budget has no room for this request now"
                self._post([TokenOutput(sequence.seq_id, "", error=message, error_status=503)])
                continue
            try:
                cached = self._engine.add(sequence.seq_id, sequence.job)
            except Exception as exc:  # one bad request must not take the batch down
                logger.exception("could not start sequence %d", sequence.seq_id)
                self._post([TokenOutput(sequence.seq_id, "", error=str(exc) or type(exc).__name__)])
                continue
            self._running[sequence.seq_id] = sequence
            if cached:
                self._cached_prompt_tokens[sequence.seq_id] = cached

    def _next_fair(self) -> _Sequence | None:
        """Take the waiting sequence whose client holds fewest rows (the longest waiting among equals), skipping
        clients at --max-rows-per-client."""
        held = Counter(sequence.job.client for sequence in self._running.values())
        cap = self.max_rows_per_client
        chosen: int | None = None
        for index, sequence in enumerate(self._waiting):
            rows = held[sequence.job.client]
            if cap and rows >= cap:
                continue
            if chosen is None or rows < held[self._waiting[chosen].job.client]:
                chosen = index
                if rows == 0:
                    break
        if chosen is None:
            return None
        sequence = self._waiting[chosen]
        del self._waiting[chosen]
        return sequence

    def _step(self) -> None:
        if self._engine is None:  # a failed reset left none; _reset_engine failed what was running
            return
        try:
            outputs = self._engine.step()
        except Exception as exc:
            self._reset_engine("step", exc)
            return
        self.steps += 1
        delivered = []
        stopped = []
        for output in outputs:
            sequence = self._running.get(output.seq_id)
            if sequence is None:
                continue
            if output.error is not None:  # its own processing failed; the engine has dropped it, the rest go on
                del self._running[output.seq_id]
                delivered.append(output)
                continue
            text, reached_stop = sequence.stops.feed(output.text)
            if reached_stop is not None:
                stopped.append(output.seq_id)
                finish_reason = "stop"
            elif output.finish_reason is not None:
                text += sequence.stops.flush()
                finish_reason = output.finish_reason
            else:
                finish_reason = None
            if finish_reason is not None:
                del self._running[output.seq_id]
            delivered.append(
                TokenOutput(
                    output.seq_id,
                    text,
                    finish_reason,
                    logprob=output.logprob,
                    stop_sequence=reached_stop,
                    drafts=output.drafts,
                )
            )
        self._post(delivered)
        if stopped:
            self._remove(stopped)

    def _drop(self, seq_id: int) -> None:
        if self._running.pop(seq_id, None) is not None:
            self._remove([seq_id])
        else:
            self._waiting = deque(s for s in self._waiting if s.seq_id != seq_id)

    def _remove(self, seq_ids: list[int]) -> None:
        if self._engine is None:
            return
        try:
            self._engine.remove(seq_ids)
        except Exception as exc:
            self._reset_engine("remove", exc)

    def _reset_engine(self, operation: str, exc: Exception) -> None:
        """After an engine call fails the batch's state is unknown: fail what it held and start a fresh engine."""
        logger.exception("engine %s failed; failing %d sequences", operation, len(self._running), exc_info=exc)
        # An ApiError says what the clients should see (a lost rank of a sharded model: 503).
        status = exc.status_code if isinstance(exc, ApiError) else 500
        message = exc.message if isinstance(exc, ApiError) else str(exc) or type(exc).__name__
        failed = [TokenOutput(seq_id, "", error=message, error_status=status) for seq_id in self._running]
        self._running.clear()
        self._post(failed)
        self._close_quietly(self._engine)
        self._engine = None
        if self._model is None:
            return
        try:
            self._engine = self._model.create_engine(self.max_concurrency)
        except Exception:
            logger.exception("could not start a fresh engine; requests fail until the next load")
            self._engine = None

    def _swap(self, swap: Swap) -> None:
        load, future = swap.load, swap.future
        self._close_model()
        try:
            model = load()
            engine = None
            if model is not None and not isinstance(model, EmbeddingModel):  # an encoder's work is embedding passes
                engine = model.create_engine(self.max_concurrency)
        except BaseException as exc:
            future.set_exception(exc)
            return
        self._model, self._engine = model, engine
        if model is not None:
            self._release_thread = model.release_thread
        future.set_result(model)

    def _close_model(self) -> None:
        engine, model = self._engine, self._model
        self._model = self._engine = None
        self._close_quietly(engine)
        self._close_quietly(model)

    @staticmethod
    def _close_quietly(resource: Engine | LoadedModel | None) -> None:
        # A failure to free memory must not stop the engine thread (and with it every later request and load).
        if resource is not None:
            try:
                resource.close()
            except Exception:
                logger.exception("closing %s failed", type(resource).__name__)

    def _post(self, outputs: list[TokenOutput]) -> None:
        cached, self._cached_prompt_tokens = self._cached_prompt_tokens, {}
        if (outputs or cached) and self._loop is not None:
            self._loop.call_soon_threadsafe(self._deliver, outputs, cached)

    def _update_counts(self) -> None:
        self.waiting_count = len(self._waiting) + len(self._embeddings)
        self.active_count = len(self._running)
        engine = self._engine
        self.cache_stats = engine.cache_stats() if engine is not None else CacheStats()
        self.cache_bytes = engine.cache_bytes() if engine is not None else 0
        self.kv_reserved = reserved_bytes(engine, (s.job for s in self._running.values())) if engine else 0
