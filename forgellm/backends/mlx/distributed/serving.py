"""The MLX backend's part in a distributed group: rank 0 leads, the others follow, and a broken group ends every
rank's process (rank 0's after its server stops: it closes its port, refuses generations with 503 meanwhile,
and exits with status 1 so that a supervisor restarts the group)."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

import mlx.core as mx

from forgellm import Rank
from forgellm.backends.mlx.distributed.channel import ControlChannel
from forgellm.backends.mlx.distributed.follower import Follower
from forgellm.backends.mlx.distributed.leader import Leader, LockstepModel, Timeouts
from forgellm.backends.mlx.distributed.sharding import Sharding
from forgellm.backends.mlx.model import MlxModel

logger = logging.getLogger("forgellm.distributed")

BROKEN_LINGER = 2.0  # seconds rank 0 answers 503 after its group broke, before it stops


class DistributedServing:
    def __init__(self, group: mx.distributed.Group, parallel: str, timeouts: Timeouts, drain_timeout: float) -> None:
        self.sharding = Sharding(group, parallel)
        self.timeouts = timeouts
        self._drain_timeout = drain_timeout
        self.channel = ControlChannel(group, self._broken)
        self.rank = group.rank()
        self.leader: Leader | None = None
        if self.rank == 0:
            self.leader = Leader(self.channel, timeouts)
            self.leader.start()
            logger.info("rank 0 of %d: serving HTTP, leading %s", group.size(), ", ".join(self.leader.hosts))

    def load(self, name: str, prepare: Callable[[], Any], build: Callable[[Any], MlxModel]) -> LockstepModel:
        assert self.leader is not None
        return self.leader.load(name, prepare, build)

    def follow(self, prepare: Callable[[str], Any], build: Callable[[str, Any], MlxModel]) -> int:
        self.channel.start_watchdog()
        return Follower(self.channel, self.timeouts, prepare, build, grace=self._drain_timeout + 10).run()

    def ranks(self) -> tuple[Rank, ...]:
        return tuple(self.leader.ranks) if self.leader is not None else ()

    def unavailable(self) -> str | None:
        broken = self.channel.broken
        return f"The model's distributed group is broken: {broken}" if broken is not None else None

    def close(self) -> None:
        if self.leader is not None:
            self.leader.stop()
        if self.channel.broken is not None:
            # Threads may still wait inside a collective that will never finish: leave without them.
            logging.shutdown()
            os._exit(1)

    def _broken(self, why: str) -> None:
        if self.rank != 0:
            logger.error("rank %d: exiting: %s", self.rank, why)
            logging.shutdown()
            os._exit(1)
        # Rank 0: answer 503 for a moment (probes and load balancers see why), then stop the server as SIGTERM
        # does, and exit even if its drain cannot finish.
        stopping = threading.Timer(BROKEN_LINGER, os.kill, (os.getpid(), signal.SIGTERM))
        deadline = threading.Timer(BROKEN_LINGER + self._drain_timeout + 10, os._exit, (1,))
        for timer in (stopping, deadline):
            timer.daemon = True
            timer.start()
