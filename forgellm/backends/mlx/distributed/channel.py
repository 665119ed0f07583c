"""Rank 0's commands to the other ranks, over the group's own collectives (no transport of our own).

A command is pickled and summed into every rank with ``all_sum``, rank 0 contributing its bytes and the
others zeros, as mlx_lm.server broadcasts its requests: one collective of HEADER_BYTES carries the length
and a short command whole, a longer one takes a second. The ranks are one trusted group (the launcher's
hostfile); a command is code-free data, but pickle is only safe between processes that trust each other.

Every wait on the other ranks has a deadline. The watchdog declares the group broken when one passes (a rank
that stopped answering), as the collectives do themselves when a rank's connection drops (a rank that
died); either way ``on_broken`` is told once, with why.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.generate import generation_stream

from forgellm import ApiError

logger = logging.getLogger("forgellm.distributed")

HEADER_BYTES = 4096  # one collective carries a command this long, less its length field; most are shorter
_LENGTH_BYTES = 8
_TEXT_BYTES = 1024  # one rank's report (an error message) in a vote
# How MLX's distributed backends begin the errors they raise when a rank's connection drops.
_TRANSPORT_ERRORS = ("[ring]", "[jaccl]", "[mpi]", "[nccl]")


class GroupBroken(ApiError):
    """A rank died or stopped answering: the group cannot compute any more (a 503 to the requests it fails)."""

    def __init__(self, why: str) -> None:
        super().__init__(503, f"The model's distributed group is broken: {why}", code="unavailable")


class ControlChannel:
    def __init__(self, group: mx.distributed.Group, on_broken: Callable[[str], None]) -> None:
        self.group = group
        self.rank = group.rank()
        self.size = group.size()
        self.lock = threading.RLock()  # held by rank 0 for a command and the work it starts, all ranks alike
        self.broken: str | None = None
        self._breaking = threading.Lock()
        self._on_broken = on_broken
        self._deadline: tuple[float, str] | None = None  # when the current wait gives up, and on what
        self.last_exchange = time.monotonic()
        self.receiving_since: float | None = None

    # -- sending and receiving -------------------------------------------------------------------
    def send(self, command: Any, timeout: float) -> None:
        """Rank 0: hand a command to every other rank (hold ``lock`` around it and the work it starts)."""
        self._exchange(pickle.dumps(command, protocol=pickle.HIGHEST_PROTOCOL), timeout, type(command).__name__)

    def receive(self) -> Any:
        """Another rank: the next command from rank 0 (waits as long as rank 0 is quiet; receiving_since says
        since when, for a watch on rank 0)."""
        self.receiving_since = time.monotonic()
        try:
            return pickle.loads(self._exchange(b"", None, "a command"))
        finally:
            self.receiving_since = None

    def _exchange(self, payload: bytes, timeout: float | None, what: str) -> bytes:
        header = np.zeros(HEADER_BYTES, dtype=np.uint8)
        if self.rank == 0:
            header[:_LENGTH_BYTES] = np.frombuffer(len(payload).to_bytes(_LENGTH_BYTES, "little"), dtype=np.uint8)
            inline = payload[: HEADER_BYTES - _LENGTH_BYTES]
            header[_LENGTH_BYTES : _LENGTH_BYTES + len(inline)] = np.frombuffer(inline, dtype=np.uint8)
        with self.waiting(timeout, f"every rank to take {what}"):
            summed = self._all_sum(header)
            length = int.from_bytes(summed[:_LENGTH_BYTES].tobytes(), "little")
            data = summed[_LENGTH_BYTES : _LENGTH_BYTES + length].tobytes()
            rest = length - len(data)
            if rest > 0:
                tail = np.zeros(rest, dtype=np.uint8)
                if self.rank == 0:
                    tail[:] = np.frombuffer(payload[len(data) :], dtype=np.uint8)
                data += self._all_sum(tail).tobytes()
        self.last_exchange = time.monotonic()
        return data

    def vote(self, problem: str | None, timeout: float | None) -> list[str | None]:
        """Every rank's problem (None: none), gathered on every rank: how ranks agree that a step they each took
        alone (a load) went well everywhere."""
        reports = self.gather_text("" if problem is None else "!" + problem, timeout, "every rank's report")
        return [report[1:] if report.startswith("!") else None for report in reports]

    def gather_numbers(self, numbers: list[int], timeout: float) -> list[list[int]]:
        """Every rank's numbers (as many on each), gathered on every rank."""
        mine = np.array(numbers, dtype=np.int64)
        with self.waiting(timeout, "every rank's status"):
            gathered = self._all_gather(mine).reshape(self.size, len(numbers))
        return gathered.tolist()

    def gather_text(self, text: str, timeout: float | None, what: str = "every rank's name") -> list[str]:
        """Every rank's text (its first _TEXT_BYTES bytes), gathered on every rank."""
        encoded = np.zeros(_TEXT_BYTES, dtype=np.uint8)
        raw = text.encode()[:_TEXT_BYTES]
        encoded[: len(raw)] = np.frombuffer(raw, dtype=np.uint8)
        with self.waiting(timeout, what):
            gathered = self._all_gather(encoded).reshape(self.size, _TEXT_BYTES)
        return [row.tobytes().rstrip(b"\0").decode(errors="replace") for row in gathered]

    def _all_sum(self, values: np.ndarray) -> np.ndarray:
        result = mx.distributed.all_sum(mx.array(values), group=self.group, stream=mx.cpu)
        mx.eval(result)
        return np.array(result, copy=True)

    def _all_gather(self, values: np.ndarray) -> np.ndarray:
        result = mx.distributed.all_gather(mx.array(values), group=self.group, stream=mx.cpu)
        mx.eval(result)
        return np.array(result, copy=True)

    @staticmethod
    def settle() -> None:
        """Wait for the work a command started to finish: mlx-lm starts each decoding step's forward pass ahead,
        and its collectives must not run beside the next command's (the ranks would pair them up differently)."""
        mx.synchronize(generation_stream)

    # -- deadlines and breakage ------------------------------------------------------------------
    @contextlib.contextmanager
    def waiting(self, timeout: float | None, what: str) -> Iterator[None]:
        """Wait on the other ranks for at most timeout seconds (None: no limit); a collective that fails means a
        rank's connection dropped."""
        if self.broken is not None:
            raise GroupBroken(self.broken)
        outer = self._deadline  # a wait inside another (a load's votes) gives the outer one back after it
        self._deadline = (time.monotonic() + timeout, what) if timeout is not None else None
        try:
            yield
        except RuntimeError as exc:
            if str(exc).startswith(_TRANSPORT_ERRORS) or "peer" in str(exc):
                self.declare_broken(f"a rank's connection was lost ({exc})")
                raise GroupBroken(self.broken or str(exc)) from None
            raise
        finally:
            self._deadline = outer

    def declare_broken(self, why: str) -> None:
        with self._breaking:
            if self.broken is not None:
                return
            self.broken = why
        logger.error("the distributed group is broken: %s", why)
        self._on_broken(why)

    def start_watchdog(self, every: float = 0.25) -> None:
        """Check the current wait's deadline every few moments, from a thread of its own (the waiting thread is
        inside a collective that cannot time out by itself)."""

        def watch() -> None:
            while self.broken is None:
                time.sleep(every)
                deadline = self._deadline
                if deadline is not None and time.monotonic() > deadline[0]:
                    self.declare_broken(f"gave up waiting for {deadline[1]}: a rank stopped answering")

        threading.Thread(target=watch, name="forgellm-rank-watchdog", daemon=True).start()
