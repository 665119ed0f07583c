"""Servers for tests: in-process through Litestar's test client, or a real ``forgellm run`` process."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Iterator, Optional, Sequence

import httpx
from litestar.testing import TestClient

from forgellm.cli import collect_options
from forgellm.core.app import create_app
from forgellm.core.plugins import create_plugin_manager
from forgellm.core.settings import Settings


def make_settings(**overrides: Any) -> Settings:
    """Every installed plugin's defaults, with overrides (``plugins="auth"``, ``api_key=("k",)``, ...)."""
    return Settings.from_options(collect_options(create_plugin_manager()), **overrides)


def wait_until_loaded(client, timeout: float = 60.0) -> dict:
    """Poll status as the guide's client does; return the final status, loaded or failed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get("/api/model/status").json()
        if not status.get("is_loading"):
            return status
        time.sleep(0.05)
    raise TimeoutError("the model did not finish loading")


@contextlib.contextmanager
def test_client(
    model: Optional[os.PathLike | str] = None,
    *,
    adapter: Optional[os.PathLike | str] = None,
    headers: Optional[dict] = None,
    **settings: Any,
) -> Iterator[TestClient]:
    """An in-process server with the given settings; with model, it is loaded before the block runs."""
    if model is not None:
        settings["model"] = str(model)
        settings["adapter"] = str(adapter) if adapter else None
    app = create_app(make_settings(**settings))
    with TestClient(app) as client:
        client.headers.update(headers or {})
        if model is not None:
            status = wait_until_loaded(client)
            if not status.get("loaded"):
                raise RuntimeError(f"the test model failed to load: {status}")
        yield client


test_client.__test__ = False  # not a pytest test, despite its name


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """``forgellm run`` in a subprocess on a free port; use as a context manager."""

    def __init__(self, args: Sequence[str] = (), *, env: Optional[dict] = None, port: Optional[int] = None,
                 scheme: str = "http", wait_ready: bool = True) -> None:
        self.port = port or free_port()
        self.args = ["--host", "127.0.0.1", "--port", str(self.port), *args]
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.wait_ready = wait_ready
        self.process: Optional[subprocess.Popen] = None

    def __enter__(self) -> "ServerProcess":
        self.process = subprocess.Popen(
            [sys.executable, "-m", "forgellm", "run", *self.args],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._wait_for_port()
        return self

    def _wait_for_port(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"forgellm run exited with {self.process.returncode}:\n{self.process.stdout.read()}")
            try:
                response = httpx.get(self.url + "/readyz", verify=False, timeout=2)
                if not self.wait_ready or response.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"forgellm run did not become ready on {self.url}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> tuple[int, str]:
        """Send sig, wait for exit; return (exit code, everything it printed)."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            output, _ = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            output, _ = self.process.communicate()
        return self.process.returncode, output

    def __exit__(self, *exc_info) -> None:
        if self.process is not None and self.process.poll() is None:
            self.stop()
