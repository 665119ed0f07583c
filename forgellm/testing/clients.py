"""Servers for tests: in-process through Litestar's test client, or a real ``forgellm run`` process."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

import httpx
from litestar.testing import TestClient

from forgellm.cli import collect_options
from forgellm.core.http.app import create_app
from forgellm.core.plugin_manager import available_plugins, create_plugin_manager, enabled_plugin_names
from forgellm.core.config.settings import Settings


# The in-process client's address: a name under localhost, which the default --allowed-hosts accepts.
TEST_BASE_URL = "http://testserver.localhost"


def make_settings(*, extra_plugins: Optional[Mapping[str, object]] = None, **overrides: Any) -> Settings:
    """Every installed plugin's defaults, with overrides (``plugins="auth"``, ``api_key=("k",)``, ...),
    and ``no_model=True`` unless given: without ``model`` such a server starts with none loaded.

    extra_plugins (name -> plugin object) adds the options of plugins that are not installed,
    such as the one a plugin author is testing. Overriding a setting no plugin declares is a
    TypeError, so a typo in a test fails loudly.
    """
    pm = _plugin_manager(available_plugins(), extra_plugins or {})
    overrides.setdefault("no_model", True)  # a test server without a model starts empty, fetching nothing
    return Settings.from_options(collect_options(pm), **overrides)


def _plugin_manager(names: Iterable[str], extra_plugins: Mapping[str, object]):
    """The named installed plugins plus the extras; an extra replaces an installed plugin of the same name."""
    return create_plugin_manager(
        [name for name in names if name not in extra_plugins], extra_plugins=extra_plugins.items()
    )


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
    extra_plugins: Optional[Mapping[str, object]] = None,
    **settings: Any,
) -> Iterator[TestClient]:
    """An in-process server (Litestar's TestClient, real HTTP semantics without a socket).

    - model: a model directory (``build_tiny_model``); it is loaded before the block runs, and a
      failed load raises. Without it the server starts with no model, as ``forgellm run`` does.
    - headers: sent with every request (``{"Authorization": "Bearer ..."}``).
    - extra_plugins: plugin objects to register by name, whether or not they are installed:
      ``extra_plugins={"prompt-guard": forgellm_prompt_guard}``. They are always enabled.
    - settings: any option of the core or a plugin, by name: ``plugins="auth,metrics"``,
      ``max_queue=4``, ``prompt_guard_pattern=("secret",)``.

    The client's responses are complete when returned (streams included), so it cannot hold a
    stream open while sending another request; use ``ServerProcess`` for that.
    """
    if model is not None:
        settings["model"] = str(model)
        settings["adapter"] = str(adapter) if adapter else None
    extra_plugins = extra_plugins or {}
    effective = make_settings(extra_plugins=extra_plugins, **settings)
    pm = _plugin_manager(enabled_plugin_names(effective.plugins), extra_plugins)
    app = create_app(effective, pm)
    with TestClient(app, base_url=TEST_BASE_URL) as client:
        client.headers.update(headers or {})
        if model is not None:
            _wait_for_model(app.state.server)
        yield client


def _wait_for_model(server, timeout: float = 60.0) -> None:
    """Wait on the server itself, not over HTTP: the status route may need credentials the test has not set."""
    deadline = time.monotonic() + timeout
    while server.models.state.is_loading:
        if time.monotonic() > deadline:
            raise TimeoutError("the test model did not finish loading")
        time.sleep(0.02)
    if not server.models.state.loaded:
        raise RuntimeError(f"the test model failed to load: {server.models.state.error}")


test_client.__test__ = False  # not a pytest test, despite its name


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """``forgellm run`` in a subprocess on a free port of 127.0.0.1; use as a context manager.

    - args: ``forgellm run`` arguments (``["--model", str(model), "--plugins", "auth"]``); the
      host and port are added.
    - env: extra environment variables (``{"FORGELLM_API_KEY": "k"}``); HF_HUB_OFFLINE=1 is set.
    - wait_ready: wait for ``/readyz`` to answer 200 (a model loaded); with False, only for the
      port to answer, as a server started without ``--model`` never becomes ready.
    - default_model: without ``--model``, load the backend's default model (which may fetch it);
      by default such a server starts with no model (``FORGELLM_NO_MODEL=1``).

    ``url`` is the base URL. The server's output (stdout and stderr) goes to a temporary file, so
    a chatty server never blocks on a full pipe: read it with ``output()`` at any time, or take it
    from ``stop()``, which also gives the exit code.
    """

    def __init__(self, args: Sequence[str] = (), *, env: Optional[dict] = None, port: Optional[int] = None,
                 scheme: str = "http", wait_ready: bool = True, default_model: bool = False) -> None:
        self.port = port or free_port()
        self.args = ["--host", "127.0.0.1", "--port", str(self.port), *args]
        no_model = {} if default_model else {"FORGELLM_NO_MODEL": "1"}
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", **no_model, **(env or {})}
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.wait_ready = wait_ready
        self.process: Optional[subprocess.Popen] = None
        self._log = tempfile.TemporaryFile(mode="w+", encoding="utf-8")

    def __enter__(self) -> "ServerProcess":
        self.process = subprocess.Popen(
            [sys.executable, "-m", "forgellm", "run", *self.args],
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            self._wait_for_port()
        except BaseException:
            self.__exit__()
            raise
        return self

    def output(self) -> str:
        """Everything the server has printed so far."""
        self._log.flush()
        self._log.seek(0)
        return self._log.read()

    def _wait_for_port(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"forgellm run exited with {self.process.returncode}:\n{self.output()}")
            try:
                response = httpx.get(self.url + "/readyz", verify=False, timeout=2)
                if not self.wait_ready or response.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"forgellm run did not become ready on {self.url}:\n{self.output()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> tuple[int, str]:
        """Send sig, wait for exit (killing it after timeout); return (exit code, everything it printed)."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        return self.process.returncode, self.output()

    def __exit__(self, *exc_info) -> None:
        if self.process is not None and self.process.poll() is None:
            self.stop()
        self._log.close()
