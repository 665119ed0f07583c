"""Resident models: several loaded at once, each with its own batch, under a memory budget.

Each resident model has its own ``ModelManager`` (state, loads, the guide's status) and its own
``Scheduler`` (a continuous batch on an engine thread of its own), so requests to different
models make progress at the same time. The first resident is the *default*: the guide's routes
speak of it, and a request that names no model gets it.

A load that would pass ``--memory-budget`` (weights and KV caches in use, as the backend reports
them) or ``--max-models`` first unloads the least recently used idle model that is not pinned; a
model with requests in flight is never unloaded; when nothing can go, the load is refused with a
503 and ``Retry-After``. Unpinned models idle for ``--keep-alive`` seconds are unloaded.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forgellm.core.engine.backend import Backend, LoadedModel
from forgellm.core.engine.scheduler import Scheduler
from forgellm.core.errors import ApiError, bad_request, service_unavailable
from forgellm.core.models.manager import ModelManager, require_allowed
from forgellm.core.models.sampling_defaults import DEFAULT_MODEL

logger = logging.getLogger("forgellm.models")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")


def parse_model_spec(spec: str) -> tuple[str | None, str]:
    """``coder=PATH`` as ("coder", "PATH"); a bare source has no name of its own."""
    name, equals, source = spec.partition("=")
    if equals and _NAME.match(name) and source:
        return name, source
    return None, spec


@dataclass
class Resident:
    """One model the server holds (or is loading), known to requests by ``name``."""

    name: str
    manager: ModelManager
    scheduler: Scheduler
    pinned: bool
    last_used: float = field(default_factory=time.time)
    pending: int = 0  # requests that chose this model and are not yet in its queue

    @property
    def model(self) -> LoadedModel | None:
        return self.manager.current

    @property
    def busy(self) -> bool:
        return self.pending > 0 or self.scheduler.in_flight > 0

    @property
    def unloadable(self) -> bool:
        """Whether the registry may unload it on its own (to make room, or idle): loaded, unpinned, idle."""
        return self.model is not None and not self.pinned and not self.busy

    @property
    def memory_bytes(self) -> int:
        """Its weights and the KV caches its engine holds, as the backend reports them."""
        model = self.model
        return (int(getattr(model, "memory_bytes", 0)) if model is not None else 0) + self.scheduler.cache_bytes

    def answers_to(self, requested: str) -> bool:
        state = self.manager.state
        if requested in (self.name, state.model_name) or (self.model is not None and requested == self.model.name):
            return True
        # Another spelling of the same local directory or file (models//smol, ./models/smol/) is the same model.
        return state.model_name is not None and source_key(requested) == source_key(state.model_name)

    @property
    def failed(self) -> bool:
        """Its load failed: it holds no model, and its error says why."""
        state = self.manager.state
        return self.model is None and not state.is_loading and state.error is not None

    def touch(self) -> None:
        self.last_used = time.time()


@functools.lru_cache(maxsize=1024)
def source_key(source: str) -> str:
    """What a model source names, whatever its spelling: a local path's real path (symbolic links, ``..``,
    doubled and trailing slashes resolved), else the name as given (a repo id, a built-in name)."""
    path = os.path.expanduser(source)
    try:
        if os.path.exists(path):
            return os.path.realpath(path)
    except (OSError, ValueError):
        pass
    return source


def device_memory_bytes(backend: Backend) -> int:
    """The memory a budget's fraction is of: what the backend says its device has, else the machine's RAM."""
    reported = getattr(backend, "device_memory_bytes", None)
    if callable(reported):
        value = reported()
        if value:
            return int(value)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def on_disk_bytes(source: str) -> int:
    """A local model's size on disk (its weights files), an estimate of what loading it takes; 0 when unknown."""
    path = Path(source).expanduser()
    try:
        if path.is_file():
            return path.stat().st_size
        if path.is_dir():
            return sum(p.stat().st_size for p in path.glob("*.safetensors"))
    except OSError:
        pass
    return 0


class ModelRegistry:
    def __init__(
        self,
        backend: Backend,
        *,
        max_concurrency: int,
        max_queue: int,
        load_timeout: float,
        max_rows_per_client: int = 0,
        allow_patterns: tuple[str, ...],
        memory_budget: int | None,
        max_models: int,
        keep_alive: float,
        load_wait: float,
        authorized_to_load: Callable[[Any], Awaitable[bool]],
        sampling_defaults: Mapping[str, Mapping[str, float]] | None = None,
    ) -> None:
        self._backend = backend
        self._max_concurrency = max_concurrency
        self._max_queue = max_queue
        self._max_rows_per_client = max_rows_per_client
        self._load_timeout = load_timeout
        self._allow_patterns = allow_patterns
        self.memory_budget = memory_budget
        self.max_models = max_models
        self.keep_alive = keep_alive
        self._load_wait = load_wait
        self._authorized_to_load = authorized_to_load  # async (caller) -> bool: may this caller load models
        self._operator_sampling = dict(sampling_defaults or {})  # by served name; DEFAULT_MODEL: the default's
        self._started = False
        self.residents: list[Resident] = [self._new_resident("default", pinned=True)]
        self.evictions: dict[str, int] = {}  # by model name, for the metrics
        self._sweeper: asyncio.Task[None] | None = None

    # -- the default model (the guide's) ---------------------------------------------------------
    @property
    def default(self) -> Resident:
        return self.residents[0]

    def make_default(self, model_name: str, adapter: str | None) -> bool:
        """Make the resident model loaded from this source (and adapter) the default, as the guide's load of a
        model already resident does; False when there is none."""
        for resident in self.residents[1:]:
            state = resident.manager.state
            if state.loaded and state.model_name == model_name and state.adapter_path == adapter:
                previous = self.default
                self.residents.remove(resident)
                self.residents.insert(0, resident)
                if previous.model is None and not previous.manager.state.is_loading:
                    self.residents.remove(previous)  # an empty slot is not a model to list
                    asyncio.ensure_future(previous.scheduler.stop(timeout=None))
                return True
        return False

    def _new_resident(self, name: str, pinned: bool) -> Resident:
        scheduler = Scheduler(
            max_concurrency=self._max_concurrency,
            max_queue=self._max_queue,
            max_rows_per_client=self._max_rows_per_client,
        )
        manager = ModelManager(self._backend, scheduler, self._load_timeout, self._allow_patterns)
        resident = Resident(name, manager, scheduler, pinned)
        if self._started:
            scheduler.start()
        return resident

    # -- life cycle --------------------------------------------------------------------------------
    def start(self, sweep_every: float = 1.0) -> None:
        self._started = True
        for resident in self.residents:
            resident.scheduler.start()
        if self.keep_alive > 0:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep(sweep_every))

    async def stop(self, timeout: float | None) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        await asyncio.gather(*(resident.scheduler.stop(timeout=timeout) for resident in self.residents))

    async def load_at_start(self, specs: tuple[str, ...], adapter: str | None, pinned: bool) -> None:
        """The operator's models: the first is the default (with --adapter), each loads in the background."""
        for number, spec in enumerate(specs):
            name, source = parse_model_spec(spec)
            if number == 0:
                self.default.name, self.default.pinned = name or source, pinned
                self.default.manager.start_load(source, adapter)
            else:
                await self._add(name or source, source, None, pinned)

    # -- finding the model a request names ---------------------------------------------------------
    def find(self, requested: str) -> Resident | None:
        return next((resident for resident in self.residents if resident.answers_to(requested)), None)

    def _named(self, name: str) -> Resident | None:
        return next((resident for resident in self.residents if resident.name == name), None)

    def sampling_defaults(self, resident: Resident) -> dict[str, float]:
        """The sampling a request to this model gets for the fields it leaves out: the operator's defaults for
        it over its own generation_config.json's."""
        operator = self._operator_sampling.get(resident.name)
        if operator is None and resident is self.default:
            operator = self._operator_sampling.get(DEFAULT_MODEL)
        own: Mapping[str, float] = getattr(resident.model, "sampling_defaults", None) or {}
        return {**own, **(operator or {})}

    def names(self) -> list[str]:
        return [resident.name for resident in self.residents if resident.model is not None]

    async def serving(self, requested: str | None, caller: Any) -> tuple[Resident, LoadedModel]:
        """The resident model a request names (the default when it names none) and its loaded model, loading it
        first when it is allowed and the caller may load models; waits up to --model-load-wait for a load under
        way. No model for the default is the guide's 400, one loading its 503."""
        if requested is None or self.default.answers_to(requested):
            return self.default, self.default.manager.require_model()
        resident = self.find(requested)
        if resident is None:
            resident = await self._load_on_demand(requested, caller)
        if resident.manager.state.is_loading:
            await self._wait_for(resident)
        if resident.failed:  # kept a while after its load failed, so that requests learn why
            raise ApiError(
                404,
                f"The model '{requested}' could not be loaded: {resident.manager.state.error}",
                code="model_load_failed",
            )
        return resident, resident.manager.require_model()

    async def _load_on_demand(self, requested: str, caller: Any) -> Resident:
        if not self._allow_patterns:
            raise self._not_served(requested)
        try:
            require_allowed(requested, self._allow_patterns)
        except ApiError:
            raise self._not_served(requested) from None
        if not await self._authorized_to_load(caller):
            raise self._not_resident(requested, "; loading it needs the models:load scope")
        self.default.manager.check_load_target(requested, None)  # a missing path starts no load at all
        resident = self.find(requested)  # another request may have started it meanwhile
        if resident is not None:
            return resident
        return await self._add(requested, requested, None, pinned=False, from_client=True)

    def _not_served(self, requested: str) -> ApiError:
        """What a generation naming a model that is not resident (and will not be loaded) gets."""
        if not self.names() and not any(r.manager.state.is_loading for r in self.residents):
            return bad_request("No model loaded")  # as the guide's clients know it
        return self._not_resident(requested)

    def _not_resident(self, requested: str, why: str = "") -> ApiError:
        served = ", ".join(f"'{name}'" for name in self.names()) or "none"
        return ApiError(404, f"The model '{requested}' is not loaded{why}; resident models: {served}",
                        code="model_not_found")  # fmt: skip

    async def _wait_for(self, resident: Resident) -> None:
        deadline = time.monotonic() + self._load_wait
        while resident.manager.state.is_loading and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if resident.manager.state.is_loading:
            raise service_unavailable(f"Model {resident.name} is loading; retry shortly", retry_after=2)

    # -- loading and unloading by name ---------------------------------------------------------------
    async def load(self, name: str, source: str, adapter: str | None, pinned: bool) -> Resident:
        """Start loading a model under this name; the same model again is a no-op, another under a name in use a
        409."""
        existing = self._named(name)
        if existing is not None and existing.failed and existing is not self.default:
            await self._remove(existing)  # a failed load's name is free to load again
            existing = None
        if existing is not None:
            state = existing.manager.state
            if (state.loaded or state.is_loading) and state.model_name == source and state.adapter_path == adapter:
                existing.pinned = existing.pinned or pinned
                return existing
            raise ApiError(409, f"A model named {name} is resident; unload it first", code="name_in_use")
        self.default.manager.check_load_target(source, adapter)
        return await self._add(name, source, adapter, pinned, from_client=True)

    async def _add(
        self, name: str, source: str, adapter: str | None, pinned: bool, from_client: bool = False
    ) -> Resident:
        await self._make_room(on_disk_bytes(source), for_name=name)
        resident = self._new_resident(name, pinned)
        self.residents.append(resident)
        loop = asyncio.get_running_loop()
        future = resident.manager.start_load(source, adapter, from_client=from_client)
        future.add_done_callback(lambda done: loop.call_soon_threadsafe(self._after_load, resident))
        return resident

    def _after_load(self, resident: Resident) -> None:
        """A failed load's engine thread ends at once, and the slot leaves the registry after a while (its
        error read meanwhile by /api/models and by requests naming it); a model that turned out bigger than the
        room left is unloaded again."""
        if resident.model is None:
            asyncio.ensure_future(resident.scheduler.stop(timeout=None))
            asyncio.ensure_future(self._remove_later(resident))
        elif self.memory_budget is not None:
            asyncio.ensure_future(self._fit_after_load(resident))

    async def _fit_after_load(self, resident: Resident) -> None:
        try:
            await self._make_room(0, for_name=resident.name, keep=resident)
        except ApiError as refused:
            logger.error("unloading %s again: %s", resident.name, refused.message)
            await self._remove(resident)

    async def _remove_later(self, resident: Resident, linger: float = 30.0) -> None:
        await asyncio.sleep(linger)
        if resident in self.residents and resident is not self.default and resident.model is None:
            await self._remove(resident)

    async def unload(self, name: str) -> None:
        """Unload a model by name, once its requests in flight have finished; the default stays as a slot."""
        resident = self._named(name)
        if resident is None:
            raise self._not_resident(name)
        if resident is self.default:
            await asyncio.wrap_future(resident.manager.unload())
            return
        await self._remove(resident)

    async def _remove(self, resident: Resident) -> None:
        if resident in self.residents:
            self.residents.remove(resident)
        await resident.scheduler.stop(timeout=None)  # finishes admitted work, then frees the model

    # -- the budget ----------------------------------------------------------------------------------
    def memory_in_use(self) -> int:
        return sum(resident.memory_bytes for resident in self.residents)

    def _count(self) -> int:
        return sum(1 for r in self.residents if r.model is not None or r.manager.state.is_loading)

    async def _make_room(self, needed: int, for_name: str, keep: Resident | None = None) -> None:
        """Unload idle unpinned models, least recently used first, until `needed` more bytes (and one more
        model, unless keep is already counted) fit; refuse with a 503 when nothing else can go."""

        def over() -> bool:
            extra = 0 if keep is not None else 1
            too_many = self.max_models > 0 and self._count() + extra > self.max_models
            too_big = self.memory_budget is not None and self.memory_in_use() + needed > self.memory_budget
            return too_many or too_big

        while over():
            candidates = [r for r in self.residents if r is not keep and r.unloadable]
            if not candidates:
                budget = f"{self.memory_budget:,} bytes" if self.memory_budget is not None else "no byte limit"
                raise service_unavailable(
                    f"Not enough room to load {for_name}: {self.memory_in_use():,} bytes in use of {budget}, "
                    f"{self._count()} models of at most {self.max_models or 'any number'}, and every other model "
                    "is pinned or has requests in flight",
                    retry_after=5,
                )
            victim = min(candidates, key=lambda r: r.last_used)
            logger.info("unloading %s (least recently used) to make room for %s", victim.name, for_name)
            self.evictions[victim.name] = self.evictions.get(victim.name, 0) + 1
            await self._remove(victim)

    async def _sweep(self, every: float) -> None:
        """Unload unpinned models idle for longer than --keep-alive."""
        while True:
            await asyncio.sleep(every)
            now = time.time()
            for resident in list(self.residents):
                if resident.unloadable and now - resident.last_used > self.keep_alive:
                    logger.info("unloading %s: idle for more than %gs (--keep-alive)", resident.name, self.keep_alive)
                    await self.unload(resident.name)
