"""Rank 0's side of a sharded model: the model and engine the scheduler drives, each operation told to every
rank before rank 0 does the same work, under one lock, so that every rank computes the same steps in the
same order (their collectives pair up) and draws the same tokens.

Every rank computes; none receives its tokens from another. After tensor parallelism's all_sum, or the
pipeline's last stage handing its output on, every rank holds the same logits, and the same seed, the same
sampler and the same processors (grammars, penalties) draw the same token from them. That costs nothing per
step beyond the command itself, where broadcasting rank 0's tokens would add a collective to every step.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from forgellm import CacheStats, Engine, GenerationJob, LoadedModel, Rank, TokenOutput
from forgellm.backends.mlx.distributed.channel import ControlChannel
from forgellm.backends.mlx.distributed.commands import (
    AddSequence,
    CloseEngine,
    CloseModel,
    Command,
    CreateEngine,
    Heartbeat,
    LoadModel,
    RemoveSequences,
    Shutdown,
    Step,
)
from forgellm.backends.mlx.distributed.rank_status import local_numbers
from forgellm.backends.mlx.model import MlxModel

logger = logging.getLogger("forgellm.distributed")

# While rank 0 has nothing to send, it sends a heartbeat after IDLE_AFTER seconds, and then nothing for a pause
# that grows with the idle time up to MAX_PAUSE (the most a request arriving then waits for the group).
IDLE_AFTER = 0.05
MIN_PAUSE, MAX_PAUSE = 0.02, 0.2
REPORT_EVERY = 1.0  # seconds between status reports, idle or busy


@dataclass(frozen=True)
class Timeouts:
    rank: float  # a command or a step (--rank-timeout)
    load: float | None  # a load on every rank (--load-timeout)


class Leader:
    """Rank 0: the group's commands, its ranks' status, and what happens when it breaks."""

    def __init__(self, channel: ControlChannel, timeouts: Timeouts) -> None:
        self.channel = channel
        self.timeouts = timeouts
        self._ids = itertools.count(1)
        self.ranks: list[Rank] = []
        self._hosts: list[str] = []
        self._models: dict[int, MlxModel] = {}
        self.engines: dict[int, Engine] = {}  # rank 0's own, by engine id
        self._quiet_until = 0.0  # no command before this (monotonic time): the others sleep until then
        self._last_command = self._last_report = time.monotonic()

    def start(self) -> None:
        """Learn every rank's host, then keep watch: deadlines, and a heartbeat while nothing else is sent."""
        with self.channel.lock:
            self._hosts = self.channel.gather_text(socket.gethostname(), self.timeouts.rank)
        self.ranks = [Rank(rank, host) for rank, host in enumerate(self._hosts)]
        self.channel.start_watchdog()
        threading.Thread(target=self._heartbeats, name="forgellm-rank-heartbeat", daemon=True).start()

    @property
    def hosts(self) -> list[str]:
        return list(self._hosts)

    @contextlib.contextmanager
    def command(self, command: Command, timeout: float | None) -> Iterator[None]:
        """Send a command, then do rank 0's part of its work inside the block (its collectives included), within
        timeout seconds of the other ranks' answers."""
        with self.channel.lock:
            time.sleep(max(0.0, self._quiet_until - time.monotonic()))
            self.channel.send(command, self.timeouts.rank)
            try:
                with self.channel.waiting(timeout, f"every rank to finish {type(command).__name__}"):
                    yield
                    self.channel.settle()
            finally:
                # Idle time counts from a command's end: a long step is no reason for a heartbeat's pause.
                self._last_command = time.monotonic()

    def tell(self, command: Command) -> None:
        """Send a command that asks nothing more of rank 0 than what it has already done alone."""
        with self.command(command, self.timeouts.rank):
            pass

    def _heartbeats(self) -> None:
        channel = self.channel
        while channel.broken is None:
            time.sleep(MIN_PAUSE / 2)
            with channel.lock:
                now = time.monotonic()
                quiet_since = max(channel.last_exchange, self._last_command)
                idle = now - quiet_since >= IDLE_AFTER and now >= self._quiet_until
                report = now - self._last_report >= REPORT_EVERY
                if not (idle or report):
                    continue
                pause = min(MAX_PAUSE, max(MIN_PAUSE, (now - self._last_command) / 4)) if idle else 0.0
                try:
                    channel.send(Heartbeat(pause, report), self.timeouts.rank)
                    if report:
                        numbers = channel.gather_numbers(
                            local_numbers(self._models.values(), self.engines.values()), self.timeouts.rank
                        )
                except Exception:  # the channel has declared the group broken and said why
                    return
                self._quiet_until = time.monotonic() + pause
                if report:
                    self._last_report = now
                    self.ranks = [Rank(rank, self._hosts[rank], *row) for rank, row in enumerate(numbers)]

    def load(self, name: str, prepare: Callable[[], Any], build: Callable[[Any], MlxModel]) -> LockstepModel:
        """Load a model on every rank: each prepares (finds the files, plans the split) and they vote, then each
        builds its part and they vote again; a rank's problem fails the load on rank 0, saying which rank."""
        model_id = next(self._ids)
        timeout = self.timeouts.load
        with self.command(LoadModel(model_id, name), timeout):
            prepared = self._agreed(prepare, timeout)
            model = self._agreed(lambda: build(prepared), timeout)
        self._models[model_id] = model
        return LockstepModel(self, model_id, model)

    def _agreed(self, work: Callable[[], Any], timeout: float | None) -> Any:
        try:
            result, problem = work(), None
        except Exception as exc:
            result, problem = None, str(exc) or type(exc).__name__
        reports = self.channel.vote(problem, timeout)
        failed = [(rank, report) for rank, report in enumerate(reports) if report is not None]
        if not failed:
            return result
        if isinstance(result, MlxModel):
            result.close()
        rank, report = failed[0]
        raise ValueError(report if rank == 0 else f"rank {rank} ({self._hosts[rank]}): {report}")

    def forget(self, model_id: int) -> None:
        self._models.pop(model_id, None)

    def new_id(self) -> int:
        return next(self._ids)

    def stop(self) -> None:
        """Tell every rank to exit (the server is stopping)."""
        if self.channel.broken is not None:
            return
        try:
            with self.channel.lock:
                self.channel.send(Shutdown(), self.timeouts.rank)
        except Exception:
            logger.warning("could not tell every rank to stop: %s", self.channel.broken)


class LockstepModel(LoadedModel):
    """Rank 0's part of a sharded model, whose engines run in lockstep on every rank."""

    def __init__(self, leader: Leader, model_id: int, inner: MlxModel) -> None:
        self.leader, self.model_id, self.inner = leader, model_id, inner
        self.name = inner.name
        self.adapter_path = inner.adapter_path
        self.vocab_size = inner.vocab_size
        self.context_length = inner.context_length
        self.output_format = inner.output_format
        self.memory_bytes = inner.memory_bytes
        self.sampling_defaults = inner.sampling_defaults

    @property
    def has_chat_template(self) -> bool:
        return self.inner.has_chat_template

    def encode(self, text: str) -> list[int]:
        return self.inner.encode(text)

    def encode_chat(
        self, messages: list[dict], *, tools: list[dict] | None = None, template_options: dict | None = None
    ) -> list[int]:
        return self.inner.encode_chat(messages, tools=tools, template_options=template_options)

    def check_constraint(self, constraint: Any) -> None:
        self.inner.check_constraint(constraint)

    def create_engine(self, max_batch_size: int) -> Engine:
        engine_id = self.leader.new_id()
        seed = int.from_bytes(os.urandom(8), "little") >> 1
        with self.leader.command(
            CreateEngine(self.model_id, engine_id, max_batch_size, seed), self.leader.timeouts.rank
        ):
            engine = self.inner.create_engine(max_batch_size, seed=seed)
        self.leader.engines[engine_id] = engine
        return LockstepEngine(self.leader, engine_id, engine)

    def close(self) -> None:
        self.leader.forget(self.model_id)
        try:
            if self.leader.channel.broken is None:  # else the others have gone, and nothing is left to tell
                self.leader.tell(CloseModel(self.model_id))
        finally:
            self.inner.close()

    release_thread = staticmethod(MlxModel.release_thread)


class LockstepEngine(Engine):
    """Rank 0's engine: what computes (adding, removing, stepping) is told to every rank first."""

    def __init__(self, leader: Leader, engine_id: int, inner: Engine) -> None:
        self.leader, self.engine_id, self.inner = leader, engine_id, inner

    def add(self, seq_id: int, job: GenerationJob) -> int:
        entries = self.inner.cache_stats().memory_entries
        cached = self.inner.add(seq_id, job)  # a prompt rank 0 refuses never reaches the others
        self.leader.tell(AddSequence(self.engine_id, seq_id, job, entries, cached))
        return cached

    def step(self) -> list[TokenOutput]:
        with self.leader.command(Step(self.engine_id), self.leader.timeouts.rank):
            return self.inner.step()

    def remove(self, seq_ids: Iterable[int]) -> None:
        seq_ids = tuple(seq_ids)
        with self.leader.command(RemoveSequences(self.engine_id, seq_ids), self.leader.timeouts.rank):
            self.inner.remove(seq_ids)

    def __len__(self) -> int:
        return len(self.inner)

    def cache_stats(self) -> CacheStats:
        return self.inner.cache_stats()

    def cache_bytes(self) -> int:
        return self.inner.cache_bytes()

    def kv_bytes(self, rows: int, longest: int) -> int:
        return self.inner.kv_bytes(rows, longest)

    def release_cache(self, nbytes: int) -> None:
        # The others drop the same entries before the next prompt is looked up (AddSequence.entries).
        self.inner.release_cache(nbytes)

    def close(self) -> None:
        self.leader.engines.pop(self.engine_id, None)
        try:
            if self.leader.channel.broken is None:
                self.leader.tell(CloseEngine(self.engine_id))
        finally:
            self.inner.close()
