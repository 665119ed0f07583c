"""The model manager: which model serves, loading in the background, and the status the guide's clients poll."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import fnmatch
import logging
import os
import time
from dataclasses import dataclass
from typing import Optional, Sequence

from forgellm.backends.base import Backend, LoadedModel
from forgellm.core.errors import ApiError, bad_request, service_unavailable
from forgellm.core.scheduler import Scheduler

logger = logging.getLogger("forgellm.models")


@dataclass(frozen=True)
class ModelState:
    """One snapshot of the model's state; replaced whole, so readers on any thread see a consistent one."""

    model_name: Optional[str] = None
    adapter_path: Optional[str] = None
    loaded: bool = False
    is_loading: bool = False
    error: Optional[str] = None
    load_seconds: Optional[float] = None
    progress: Optional[str] = None  # what a running load is doing (fetching, converting, loading weights)


class ModelManager:
    """Loads run on the engine thread after in-flight work drains; a second load while one runs is a 409."""

    def __init__(self, backend: Backend, scheduler: Scheduler) -> None:
        self._backend = backend
        self._scheduler = scheduler
        self._state = ModelState()
        self._model: Optional[LoadedModel] = None

    @property
    def state(self) -> ModelState:
        return self._state

    def status(self) -> dict:
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

    def start_load(self, model_name: str, adapter_path: Optional[str]) -> concurrent.futures.Future:
        """Begin loading in the background; status shows is_loading before this returns."""
        if self._state.is_loading:
            raise ApiError(
                409,
                f"Model {self._state.model_name} is already loading; wait for it to finish",
                code="load_in_progress",
            )
        self._state = ModelState(model_name=model_name, adapter_path=adapter_path, is_loading=True)
        self._model = None
        started = time.perf_counter()

        def report(text: str) -> None:
            logger.info("loading %s: %s", model_name, text)
            if self._state.is_loading and self._state.model_name == model_name:
                self._state = dataclasses.replace(self._state, progress=text)

        def load() -> LoadedModel:
            return self._backend.load(model_name, adapter_path, report)

        future = self._scheduler.swap_model(load)
        future.add_done_callback(lambda done: self._finish_load(done, model_name, adapter_path, started))
        return future

    def _finish_load(self, done: concurrent.futures.Future, model_name, adapter_path, started: float) -> None:
        error = done.exception()
        if error is not None:
            logger.error("loading %s failed: %s", model_name, error)
            self._state = ModelState(model_name=model_name, adapter_path=adapter_path, error=_describe(error))
            return
        self._model = done.result()
        seconds = time.perf_counter() - started
        logger.info("loaded %s in %.2fs", model_name, seconds)
        self._state = ModelState(model_name=model_name, adapter_path=adapter_path, loaded=True, load_seconds=seconds)

    def unload(self) -> concurrent.futures.Future:
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
    def current(self) -> Optional[LoadedModel]:
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


def _describe(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    # mlx-lm reports some failures over several lines; the first says what went wrong.
    return f"{type(error).__name__}: {text.splitlines()[0]}"
