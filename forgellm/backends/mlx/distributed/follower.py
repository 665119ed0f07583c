"""A rank other than 0: no HTTP, no plugins; it does what rank 0 tells it, in the order told, until rank 0 says
stop or the group breaks, and never outlives the group.

It watches rank 0 as rank 0 watches it: rank 0 sends a heartbeat, then pauses at most MAX_PAUSE, whenever it
has had nothing else to say for a moment, so a command that does not come within its deadline means rank 0 has
stopped answering. SIGINT and SIGTERM
(mlx.launch passes Ctrl-C on to every rank) let rank 0 end the group, which drains its requests first; a rank
that hears nothing more within the grace period exits on its own.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from forgellm import Engine
from forgellm.backends.mlx.distributed.channel import ControlChannel, GroupBroken
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
from forgellm.backends.mlx.distributed.leader import MAX_PAUSE, Timeouts
from forgellm.backends.mlx.distributed.rank_status import local_numbers
from forgellm.backends.mlx.model import MlxModel

logger = logging.getLogger("forgellm.distributed")


class Diverged(RuntimeError):
    """This rank's state no longer matches rank 0's: it cannot follow any more."""


class Follower:
    def __init__(
        self,
        channel: ControlChannel,
        timeouts: Timeouts,
        prepare: Callable[[str], Any],
        build: Callable[[str, Any], MlxModel],
        grace: float,
    ) -> None:
        self.channel = channel
        self.timeouts = timeouts
        self._prepare, self._build = prepare, build
        self._grace = grace
        self._models: dict[int, MlxModel] = {}
        self._engines: dict[int, Engine] = {}
        self._stop_asked_at: float | None = None

    def run(self) -> int:
        """Follow rank 0 until it says stop (0) or the group breaks (1): the process's exit status."""
        channel = self.channel
        channel.gather_text(socket.gethostname(), self.timeouts.rank)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._stop_asked)
        threading.Thread(target=self._watch_rank_0, name="forgellm-rank-0-watch", daemon=True).start()
        logger.info("rank %d of %d: following rank 0", channel.rank, channel.size)
        try:
            while True:
                command = channel.receive()
                if isinstance(command, Shutdown):
                    logger.info("rank %d: rank 0 stopped the group", channel.rank)
                    return 0
                self._do(command)
                channel.settle()
        except (GroupBroken, Diverged) as exc:
            logger.error("rank %d: %s", channel.rank, exc)
            return 1
        except Exception:  # this rank cannot do what rank 0 did: it leaves, and the group breaks
            logger.exception("rank %d: could not follow rank 0", channel.rank)
            return 1
        finally:
            for engine in self._engines.values():
                engine.close()
            for model in self._models.values():
                model.close()

    def _do(self, command: Command) -> None:
        if isinstance(command, Step):
            self._engines[command.engine_id].step()
        elif isinstance(command, AddSequence):
            self._add(command)
        elif isinstance(command, RemoveSequences):
            self._engines[command.engine_id].remove(command.seq_ids)
        elif isinstance(command, Heartbeat):
            if command.report:
                self.channel.gather_numbers(
                    local_numbers(self._models.values(), self._engines.values()), self.timeouts.rank
                )
            time.sleep(command.pause)
        elif isinstance(command, CreateEngine):
            model = self._models[command.model_id]
            self._engines[command.engine_id] = model.create_engine(command.max_batch_size, seed=command.seed)
        elif isinstance(command, CloseEngine):
            engine = self._engines.pop(command.engine_id, None)
            if engine is not None:
                engine.close()
        elif isinstance(command, LoadModel):
            self._load(command)
        elif isinstance(command, CloseModel):
            closing = self._models.pop(command.model_id, None)
            if closing is not None:
                closing.close()

    def _add(self, command: AddSequence) -> None:
        engine = self._engines[command.engine_id]
        keep_newest = getattr(engine, "keep_newest_cached", None)
        if keep_newest is not None:
            keep_newest(command.entries)
        cached = engine.add(command.seq_id, command.job)
        if cached != command.cached:
            raise Diverged(
                f"sequence {command.seq_id} found {cached} prompt tokens in this rank's prompt cache, "
                f"{command.cached} in rank 0's"
            )

    def _load(self, command: LoadModel) -> None:
        timeout = self.timeouts.load
        prepared = self._agreed(lambda: self._prepare(command.name), timeout)
        if prepared is None:
            return
        model = self._agreed(lambda: self._build(command.name, prepared), timeout)
        if model is not None:
            self._models[command.model_id] = model

    def _agreed(self, work: Callable[[], Any], timeout: float | None) -> Any:
        """Do this rank's part and vote; None when any rank failed (rank 0 reports it)."""
        try:
            result, problem = work(), None
        except Exception as exc:
            logger.warning("rank %d: %s", self.channel.rank, exc)
            result, problem = None, str(exc) or type(exc).__name__
        reports = self.channel.vote(problem, timeout)
        if any(report is not None for report in reports):
            if isinstance(result, MlxModel):
                result.close()
            return None
        return result

    def _stop_asked(self, signum: int, frame: Any) -> None:
        if self._stop_asked_at is None:
            self._stop_asked_at = time.monotonic()
            logger.info("rank %d: %s; waiting for rank 0 to end the group", self.channel.rank, signal.strsignal(signum))

    def _watch_rank_0(self) -> None:
        """Exit when rank 0 is silent past a heartbeat and its deadline, or does not end the group within the
        grace period after a signal: a rank never outlives its group."""
        silent_limit = MAX_PAUSE + self.timeouts.rank
        while True:
            time.sleep(0.25)
            now = time.monotonic()
            asked = self._stop_asked_at
            if asked is not None and now - asked > self._grace:
                logger.warning(
                    "rank %d: rank 0 did not end the group within %gs; exiting", self.channel.rank, self._grace
                )
                os._exit(0)
            waiting_since = self.channel.receiving_since
            if waiting_since is not None and now - waiting_since > silent_limit:
                logger.error("rank %d: rank 0 sent nothing for %gs; exiting", self.channel.rank, silent_limit)
                os._exit(1)
