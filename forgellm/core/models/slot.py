"""A model slot: the model one resident serves, loaded in the background on its engine thread.

Its state (``ModelState``: loading with progress, loaded, failed with the reason, empty) is a typed
snapshot the routes read and turn into their own wire format; the slot knows none."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import threading
import time
from dataclasses import dataclass

from forgellm.core.engine.backend import Backend, LoadedModel
from forgellm.core.engine.scheduler import Scheduler
from forgellm.core.errors import ApiError, bad_request, service_unavailable
from forgellm.core.models.policy import LoadPolicy, not_loadable

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


class ModelSlot:
    """Loads run on the engine thread after in-flight work drains; a second load while one runs is a 409."""

    def __init__(self, backend: Backend, scheduler: Scheduler, policy: LoadPolicy, load_timeout: float = 0) -> None:
        self._backend = backend
        self._scheduler = scheduler
        self._policy = policy
        self._load_timeout = load_timeout
        self._state = ModelState()
        self._model: LoadedModel | None = None
        self._loads = 0  # numbers each load, so the result of one given up on is ignored

    @property
    def state(self) -> ModelState:
        return self._state

    def start_load(
        self, model_name: str, adapter_path: str | None, *, from_client: bool = False
    ) -> concurrent.futures.Future[LoadedModel | None]:
        """Begin loading in the background; status shows is_loading before this returns. A failed load that a
        client asked for (from_client) is described as the load policy allows; the operator's own, fully.

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
        opaque = from_client and self._policy.opaque(model_name, adapter_path)
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
            described = not_loadable(model_name, adapter_path) if opaque else _describe(error)
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


def _describe(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    # mlx-lm reports some failures over several lines; the first says what went wrong.
    return f"{type(error).__name__}: {text.splitlines()[0]}"
