"""The model manager: which model serves, loading in the background, and the status the guide's clients poll."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import fnmatch
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forgellm.core.engine.backend import Backend, LoadedModel
from forgellm.core.engine.scheduler import Scheduler
from forgellm.core.errors import ApiError, bad_request, service_unavailable

logger = logging.getLogger("forgellm.models")


@dataclass(frozen=True)
class ModelState:
    """One snapshot of the model's state; replaced whole, so readers on any thread see a consistent one."""

    model_name: str | None = None
    adapter_path: str | None = None
    loaded: bool = False
    is_loading: bool = False
    error: str | None = None
    load_seconds: float | None = None
    progress: str | None = None  # what a running load is doing (fetching, converting, loading weights)


class ModelManager:
    """Loads run on the engine thread after in-flight work drains; a second load while one runs is a 409."""

    def __init__(
        self, backend: Backend, scheduler: Scheduler, load_timeout: float = 0, allow_patterns: Sequence[str] = ()
    ) -> None:
        self._backend = backend
        self._scheduler = scheduler
        self._load_timeout = load_timeout
        self._allow_patterns = tuple(allow_patterns)
        self._state = ModelState()
        self._model: LoadedModel | None = None
        self._loads = 0  # numbers each load, so the result of one given up on is ignored

    @property
    def state(self) -> ModelState:
        return self._state

    def status(self) -> dict[str, Any]:
        state = self._state
        return {
            "success": True,
            "loaded": state.loaded,
            "is_loading": state.is_loading,
            "model_name": state.model_name,
            "adapter_path": state.adapter_path,
            "error": state.error,
            "progress": state.progress,
        }

    def check_load_target(self, model_name: str, adapter_path: str | None) -> None:
        """Refuse a load request before it starts: a name --allow-model does not allow (403), a local file or
        directory that is not there (400).

        Without --allow-model any client that may load can name any path, so a path that is missing and one
        that exists but does not load get the same answer (here and in status), and nobody can map the disk
        through load requests; the server's log has the reasons."""
        for name in (model_name, adapter_path):
            if name is not None:
                require_allowed(name, self._allow_patterns)  # before any file-system check
        missing = None
        if model_name.lower().endswith(".gguf"):
            if not _on_disk(model_name, Path.is_file):
                missing = f"GGUF file not found: {model_name}"
        elif looks_like_path(model_name) and not _on_disk(model_name, Path.is_dir):
            missing = f"Model directory not found: {model_name}"
        if missing is None and adapter_path is not None and not _on_disk(adapter_path, Path.is_dir):
            missing = f"Adapter directory not found: {adapter_path}"
        if missing is not None:
            raise bad_request(missing if self._allow_patterns else _not_loadable(model_name, adapter_path))

    def _opaque(self, model_name: str, adapter_path: str | None) -> bool:
        """Whether a failure to load this must not say why (a local path, with no --allow-model)."""
        return not self._allow_patterns and (
            looks_like_path(model_name) or model_name.lower().endswith(".gguf") or adapter_path is not None
        )

    def start_load(
        self, model_name: str, adapter_path: str | None, *, from_client: bool = False
    ) -> concurrent.futures.Future[LoadedModel | None]:
        """Begin loading in the background; status shows is_loading before this returns. A failed load that a
        client asked for (from_client) is described as check_load_target says; the operator's own, fully.

        Called on the event loop. A load still running after --load-timeout is given up: status shows the
        error, and when the backend returns at last its model is closed, never served."""
        if self._state.is_loading:
            raise ApiError(
                409,
                f"Model {self._state.model_name} is already loading; wait for it to finish",
                code="load_in_progress",
            )
        self._state = ModelState(model_name=model_name, adapter_path=adapter_path, is_loading=True)
        self._model = None
        self._loads += 1
        number = self._loads
        given_up = threading.Event()
        started = time.perf_counter()

        def report(text: str) -> None:
            logger.info("loading %s: %s", model_name, text)
            if self._loads == number and self._state.is_loading:
                self._state = dataclasses.replace(self._state, progress=text)

        def load() -> LoadedModel:
            model = self._backend.load(model_name, adapter_path, report)
            if given_up.is_set():
                model.close()
                raise TimeoutError("given up")
            return model

        future = self._scheduler.swap_model(load)
        opaque = from_client and self._opaque(model_name, adapter_path)
        future.add_done_callback(
            lambda done: self._finish_load(done, number, model_name, adapter_path, started, opaque)
        )
        if self._load_timeout > 0:
            asyncio.get_running_loop().call_later(self._load_timeout, self._give_up, number, given_up)
        return future

    def _give_up(self, number: int, given_up: threading.Event) -> None:
        if self._loads != number or not self._state.is_loading:
            return
        given_up.set()
        self._loads += 1  # whatever that load returns now is stale
        message = f"TimeoutError: the load did not finish within {self._load_timeout:g}s (--load-timeout)"
        logger.error("loading %s: %s", self._state.model_name, message)
        self._state = ModelState(
            model_name=self._state.model_name, adapter_path=self._state.adapter_path, error=message
        )

    def _finish_load(
        self,
        done: concurrent.futures.Future[LoadedModel | None],
        number: int,
        model_name: str,
        adapter_path: str | None,
        started: float,
        opaque: bool,
    ) -> None:
        if self._loads != number:
            return  # given up on, or replaced by a later load
        error = done.exception()
        if error is not None:
            logger.error("loading %s failed: %s", model_name, error)
            described = _not_loadable(model_name, adapter_path) if opaque else _describe(error)
            self._state = ModelState(model_name=model_name, adapter_path=adapter_path, error=described)
            return
        self._model = done.result()
        seconds = time.perf_counter() - started
        logger.info("loaded %s in %.2fs", model_name, seconds)
        self._state = ModelState(model_name=model_name, adapter_path=adapter_path, loaded=True, load_seconds=seconds)

    def unload(self) -> concurrent.futures.Future[LoadedModel | None]:
        if self._state.is_loading:
            raise ApiError(409, "A model is loading; wait for it to finish", code="load_in_progress")
        self._state = ModelState()
        self._model = None
        return self._scheduler.swap_model(lambda: None)

    def require_model(self) -> LoadedModel:
        """The serving model, or the error a generate request gets instead."""
        state = self._state
        if state.is_loading:
            raise service_unavailable(f"Model {state.model_name} is loading; retry shortly", retry_after=2)
        if self._model is None:
            raise bad_request("No model loaded")
        return self._model

    @property
    def current(self) -> LoadedModel | None:
        return self._model


def require_allowed(name: str, patterns: Sequence[str]) -> None:
    """Refuse (403) a model or adapter that matches none of the operator's --allow-model patterns.

    Names and patterns are compared normalized, local paths made absolute, so that
    ``/models/../etc`` cannot pass for ``/models/*``. No patterns: everything is allowed.
    """
    if not patterns:
        return
    candidate = _normalized(name)
    if not any(fnmatch.fnmatchcase(candidate, _normalized(pattern)) for pattern in patterns):
        raise ApiError(403, f"Loading {name} is not allowed on this server", code="model_not_allowed")


def _normalized(name: str) -> str:
    expanded = os.path.expanduser(name)
    if os.path.isabs(expanded) or expanded.startswith(".") or expanded.count("/") > 1:
        return os.path.abspath(expanded)  # a local path
    return os.path.normpath(expanded)  # a Hugging Face repo id ("owner/name"), or a relative path


def looks_like_path(model_name: str) -> bool:
    """Hugging Face repo ids are 'name' or 'owner/name'; anything else is meant as a local directory."""
    return model_name.startswith(("/", ".", "~")) or model_name.count("/") > 1 or _on_disk(model_name, Path.exists)


def _on_disk(name: str, test: Callable[[Path], bool]) -> bool:
    """test(path) for the name; a name the OS cannot even look up (longer than a file name may be, or ~user
    for an unknown user) is nothing on disk, not a server error."""
    try:
        return test(Path(name).expanduser())
    except (OSError, RuntimeError):
        return False


def _not_loadable(model_name: str, adapter_path: str | None) -> str:
    what = f"Model {model_name}" + (f" with adapter {adapter_path}" if adapter_path else "")
    return f"{what} was not found or is not loadable"


def _describe(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    # mlx-lm reports some failures over several lines; the first says what went wrong.
    return f"{type(error).__name__}: {text.splitlines()[0]}"
