"""Blocking Python work that can be abandoned: a deadline, or the awaiting request going away, stops it.

A chat template is a program (Jinja) supplied with the model: a template with nested loops, fed the
right conversation, renders for minutes. A worker thread cannot be killed, but Python can raise an
exception inside it at its next bytecode (``PyThreadState_SetAsyncExc``), which is where Jinja's
compiled templates spend their time. So the work runs on a daemon thread of its own (never one
that shutdown waits for), and is interrupted when the deadline passes or the caller is cancelled.
"""

from __future__ import annotations

import asyncio
import ctypes
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class Interrupted(BaseException):
    """Raised inside an abandoned worker thread to stop it (a BaseException, so ``except Exception`` in the
    work does not swallow it)."""


def _interrupt(thread: threading.Thread) -> None:
    if thread.ident is not None and thread.is_alive():
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(Interrupted))


async def run_interruptibly(function: Callable[..., T], *args: object, timeout: float) -> T:
    """function(*args) on a thread of its own; TimeoutError after timeout seconds. On a timeout, and when the
    awaiting task is cancelled, the thread is interrupted."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(result: object, error: BaseException | None) -> None:
        if done.done():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)  # type: ignore[arg-type]

    def work() -> None:
        try:
            try:
                outcome: tuple[object, BaseException | None] = (function(*args), None)
            except Interrupted:
                raise
            except BaseException as exc:  # handed to the awaiting task, which raises it
                outcome = (None, exc)
            loop.call_soon_threadsafe(settle, *outcome)
        except (Interrupted, RuntimeError):  # abandoned, or the event loop has closed meanwhile
            pass

    thread = threading.Thread(target=work, name="forgellm-interruptible", daemon=True)
    thread.start()
    try:
        return await asyncio.wait_for(asyncio.shield(done), timeout)
    except BaseException:
        _interrupt(thread)
        raise
