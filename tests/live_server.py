"""The app under uvicorn on a real socket inside the test process, for tests that need real
disconnects yet want to read the scheduler's counters directly."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import uvicorn

from forgellm.testing import create_test_app, free_port


def wait_for(condition, what: str, timeout: float = 60.0, every: float = 0.005) -> None:
    """Poll every few moments until condition() holds; the deadline only turns a broken server into a failure,
    not a hang."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)


def idle(scheduler) -> bool:
    return scheduler.in_flight == 0 and scheduler.active_count == 0 and scheduler.waiting_count == 0


class LiveServer:
    def __init__(self, app, port: int) -> None:
        self.app = app
        self.port = port
        self.url = f"http://127.0.0.1:{port}"

    @property
    def scheduler(self):
        return self.app.state.server.default_model.scheduler


@contextlib.contextmanager
def serving(model, backend=None, **settings) -> Iterator[LiveServer]:
    """The app with the model loaded (by backend, as the test kit's test_client takes it; None: none), served
    by uvicorn on a free port until the block ends."""
    app = create_test_app(model, backend=backend, **settings)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, "uvicorn to start")
        if model is not None:
            wait_for(lambda: app.state.server.default_model.slot.state.loaded, "the model to load")
        yield LiveServer(app, port)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
