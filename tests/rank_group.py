"""N ``forgellm run`` processes on loopback joined by MLX's ring backend, as mlx.launch joins them (each with
MLX_RANK and MLX_HOSTFILE set): rank 0 a ServerProcess serving HTTP, the others following it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from forgellm.testing import ServerProcess, free_port


def write_hostfile(directory: Path, ranks: int) -> Path:
    """mlx.launch's ring hostfile for this many ranks on 127.0.0.1, each on a free port."""
    hostfile = directory / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{free_port()}"] for _ in range(ranks)]))
    return hostfile


class RankGroup:
    def __init__(self, ranks: int, args: Sequence[str], directory: Path, *, wait_ready: bool = True) -> None:
        self.hostfile = write_hostfile(directory, ranks)
        self.args = list(args)
        self.ranks = ranks
        self.wait_ready = wait_ready
        self.followers: list[subprocess.Popen[str]] = []
        self._logs: list[tempfile._TemporaryFileWrapper[str]] = []
        self.server: ServerProcess | None = None

    def _env(self, rank: int) -> dict[str, str]:
        return {"MLX_RANK": str(rank), "MLX_HOSTFILE": str(self.hostfile), "HF_HUB_OFFLINE": "1"}

    def __enter__(self) -> RankGroup:
        for rank in range(1, self.ranks):
            log = tempfile.TemporaryFile(mode="w+", encoding="utf-8")
            self._logs.append(log)  # type: ignore[arg-type]
            self.followers.append(
                subprocess.Popen(
                    [sys.executable, "-m", "forgellm", "run", "--port", str(free_port()), *self.args],
                    env={**os.environ, **self._env(rank)},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
        self.server = ServerProcess(self.args, env=self._env(0), wait_ready=self.wait_ready)
        try:
            self.server.__enter__()
        except BaseException:
            self.__exit__()
            raise
        return self

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.url

    def follower_output(self, rank: int) -> str:
        log = self._logs[rank - 1]
        log.flush()
        log.seek(0)
        return log.read()

    def wait_followers(self, timeout: float) -> list[int | None]:
        """Each follower's exit status, None for one still running after timeout seconds."""
        deadline = time.monotonic() + timeout
        for follower in self.followers:
            try:
                follower.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        return [follower.poll() for follower in self.followers]

    def __exit__(self, *exc_info: object) -> None:
        if self.server is not None:
            self.server.__exit__()  # SIGTERM, if it still runs
        self.wait_followers(timeout=15)
        for follower in self.followers:
            if follower.poll() is None:
                follower.kill()
                follower.wait()
        for log in self._logs:
            log.close()
