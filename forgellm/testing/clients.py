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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, cast

import httpx
from litestar import Litestar
from litestar.testing import TestClient

from forgellm import Backend, Settings, hookimpl
from forgellm.core.app import create_app
from forgellm.core.config.options import collect_options
from forgellm.core.plugin_manager import available_plugins, create_plugin_manager, enabled_plugin_names
from forgellm.testing.schema_check import ResponseSchemaCheck

# The in-process client's address: a name under localhost, which the default --allowed-hosts accepts.
TEST_BASE_URL = "http://testserver.localhost"


def make_settings(*, extra_plugins: Mapping[str, object] | None = None, **overrides: Any) -> Settings:
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


TEST_BACKEND = "test"


class BackendPlugin:
    """Registers one backend as "test" (select it with ``backend="test"``): a Backend, or a function of the
    settings returning one, such as a double wrapping ``MlxBackend.from_settings(settings)``."""

    def __init__(self, backend: Backend | Callable[[Settings], Backend]) -> None:
        self._backend = backend

    @hookimpl
    def register_backends(self, register: Callable[[str, Backend], None], settings: Settings) -> None:
        backend = self._backend
        register(TEST_BACKEND, cast(Backend, backend) if hasattr(backend, "load") else cast(Any, backend)(settings))


BackendChoice = str | Backend | Callable[[Settings], Backend] | None


def with_backend(backend: BackendChoice, extra_plugins: Mapping[str, object], settings: dict) -> Mapping[str, object]:
    """The extra plugins and settings that serve with this backend: a registered backend's name, a Backend, or
    a function of the settings returning one (None: the default backend)."""
    if backend is None:
        return extra_plugins
    if isinstance(backend, str):
        settings["backend"] = backend
        return extra_plugins
    settings["backend"] = TEST_BACKEND
    return {**extra_plugins, "test-backend": BackendPlugin(backend)}


def create_test_app(
    model: os.PathLike | str | Sequence[os.PathLike | str] | None = None,
    *,
    adapter: os.PathLike | str | None = None,
    extra_plugins: Mapping[str, object] | None = None,
    backend: BackendChoice = None,
    **settings: Any,
) -> Litestar:
    """The app test_client serves (same arguments), for serving it some other way (uvicorn on a socket)."""
    if model is not None:
        settings["model"] = tuple(map(str, model)) if isinstance(model, list | tuple) else (str(model),)
        settings["adapter"] = str(adapter) if adapter else None
    extra_plugins = with_backend(backend, extra_plugins or {}, settings)
    effective = make_settings(extra_plugins=extra_plugins, **settings)
    return create_app(effective, _plugin_manager(enabled_plugin_names(effective.plugins), extra_plugins))


# Whether test_client checks every response against the server's OpenAPI schema (ResponseSchemaCheck)
# when not told either way; ForgeLLM's own suite turns it on for every test (tests/conftest.py).
CHECK_SCHEMA_BY_DEFAULT = False


class SchemaCheckedTestClient(TestClient):  # type: ignore[type-arg]
    """Litestar's TestClient, whose every (non-streamed) response is checked against the app's schema."""

    schema_check: ResponseSchemaCheck | None = None

    def request(self, method: str, url: Any, *args: Any, **kwargs: Any) -> httpx.Response:  # type: ignore[override]
        response = super().request(method, url, *args, **kwargs)
        if self.schema_check is not None:
            self.schema_check.check(method, response.url.path, response)
        return response


@contextlib.contextmanager
def test_client(
    model: os.PathLike | str | Sequence[os.PathLike | str] | None = None,
    *,
    adapter: os.PathLike | str | None = None,
    headers: dict | None = None,
    extra_plugins: Mapping[str, object] | None = None,
    backend: BackendChoice = None,
    wait_for_model: bool = True,
    check_schema: bool | None = None,
    **settings: Any,
) -> Iterator[TestClient]:
    """An in-process server (Litestar's TestClient, real HTTP semantics without a socket).

    - model: a model directory (``build_tiny_model``); it is loaded before the block runs, and a
      failed load raises (with wait_for_model=False the block starts while it loads). Without it
      the server starts with no model, as ``forgellm run`` does. A list serves several, as repeated
      ``--model`` does (``["a=PATH", "b=PATH"]``); the first, the default, is the one waited for.
    - headers: sent with every request (``{"Authorization": "Bearer ..."}``).
    - extra_plugins: plugin objects to register by name, whether or not they are installed:
      ``extra_plugins={"prompt-guard": forgellm_prompt_guard}``. They are always enabled.
    - backend: serve with this backend instead of the MLX one: the name a plugin registered it
      under, a Backend, or a function of the settings returning one
      (``lambda settings: Wrapped(MlxBackend.from_settings(settings))``).
    - settings: any option of the core or a plugin, by name: ``plugins="auth,metrics"``,
      ``max_queue=4``, ``prompt_guard_pattern=("secret",)``.

    - check_schema: check every response (JSON bodies, NDJSON lines, server-sent events) against the
      server's own OpenAPI schema, with keys the schema does not declare forbidden
      (``ResponseSchemaCheck``); default ``CHECK_SCHEMA_BY_DEFAULT``.

    The client's responses are complete when returned (streams included), so it cannot hold a
    stream open while sending another request; use ``ServerProcess`` for that.
    """
    app = create_test_app(model, adapter=adapter, extra_plugins=extra_plugins, backend=backend, **settings)
    with SchemaCheckedTestClient(app, base_url=TEST_BASE_URL) as client:
        if CHECK_SCHEMA_BY_DEFAULT if check_schema is None else check_schema:
            client.schema_check = ResponseSchemaCheck(app.openapi_schema.to_schema())
        client.headers.update(headers or {})
        if model is not None and wait_for_model:
            _wait_for_model(app.state.server)
        yield client


def _wait_for_model(server, timeout: float = 60.0) -> None:
    """Wait on the server itself, not over HTTP: the status route may need credentials the test has not set."""
    deadline = time.monotonic() + timeout
    while server.default_model.slot.state.is_loading:
        if time.monotonic() > deadline:
            raise TimeoutError("the test model did not finish loading")
        time.sleep(0.02)
    state = server.default_model.slot.state
    if not state.loaded:
        raise RuntimeError(f"the test model failed to load: {state.error}")


setattr(test_client, "__test__", False)  # not a pytest test, despite its name  # noqa: B010


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

    def __init__(
        self,
        args: Sequence[str] = (),
        *,
        env: dict | None = None,
        port: int | None = None,
        scheme: str = "http",
        wait_ready: bool = True,
        default_model: bool = False,
    ) -> None:
        self.port = port or free_port()
        self.args = ["--host", "127.0.0.1", "--port", str(self.port), *args]
        no_model = {} if default_model else {"FORGELLM_NO_MODEL": "1"}
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", **no_model, **(env or {})}
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.wait_ready = wait_ready
        self.process: subprocess.Popen[str] | None = None
        self._log = tempfile.TemporaryFile(mode="w+", encoding="utf-8")

    def __enter__(self) -> ServerProcess:
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

    def _started(self) -> subprocess.Popen[str]:
        if self.process is None:
            raise RuntimeError("the server process has not been started: use ServerProcess as a context manager")
        return self.process

    def _wait_for_port(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._started().poll() is not None:
                raise RuntimeError(f"forgellm run exited with {self._started().returncode}:\n{self.output()}")
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
        process = self._started()
        if process.poll() is None:
            process.send_signal(sig)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        return process.returncode, self.output()

    def __exit__(self, *exc_info) -> None:
        if self.process is not None and self.process.poll() is None:
            self.stop()
        self._log.close()
