"""Resident models: several loaded at once, each with its own batch, under a memory budget.

Each resident model has its own ``ModelSlot`` (its state, its loads) and its own
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
import concurrent.futures
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from forgellm.core.engine.backend import Backend, EmbeddingModel, LoadedModel, ModelSource
from forgellm.core.engine.scheduler import Scheduler
from forgellm.core.errors import ApiError, bad_request, service_unavailable
from forgellm.core.models.policy import LoadPolicy
from forgellm.core.models.resident import Resident, parse_model_spec
from forgellm.core.models.sampling_defaults import DEFAULT_MODEL
from forgellm.core.models.slot import ModelSlot

logger = logging.getLogger("forgellm.models")


def device_memory_bytes(backend: Backend) -> int:
    """The memory a budget's fraction is of: what the backend says its device has, else the machine's RAM."""
    return backend.device_memory_bytes() or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass(frozen=True)
class RegistryLimits:
    """What the registry holds to: the batches' sizes, the memory budget, and how loads and idle models go."""

    max_concurrency: int
    max_queue: int
    max_rows_per_client: int
    memory_budget: int | None
    max_models: int
    keep_alive: float
    load_wait: float
    load_timeout: float


# What a request asks of a model: text generated, or its inputs embedded.
Task = Literal["generate", "embed"]

# Whether the caller of a request may load models (the LOAD action), asked only when a load on demand is due.
MayLoad = Callable[[], Awaitable[bool]]


class ModelRegistry:
    def __init__(
        self,
        backend: Backend,
        policy: LoadPolicy,
        limits: RegistryLimits,
        sampling_defaults: Mapping[str, Mapping[str, float]] | None = None,
    ) -> None:
        self._backend = backend
        self.policy = policy
        self._limits = limits
        self.memory_budget = limits.memory_budget
        self.max_models = limits.max_models
        self.keep_alive = limits.keep_alive
        self._operator_sampling = dict(sampling_defaults or {})  # by served name; DEFAULT_MODEL: the default's
        self._started = False
        self.residents: list[Resident] = [self._new_resident("default", pinned=True)]
        self.evictions: dict[str, int] = {}  # by model name, for the metrics
        self._sweeper: asyncio.Task[None] | None = None
        self._backend_watch: asyncio.Task[None] | None = None

    # -- the default model (the guide's) ---------------------------------------------------------
    @property
    def default(self) -> Resident:
        return self.residents[0]

    async def load_default(self, model_name: str, adapter: str | None) -> None:
        """The guide's load: a model already resident becomes the default; any other loads into the default's
        place, in the background (a load already running is a 409)."""
        self.policy.check_target(model_name, adapter)
        if self._make_default(model_name, adapter):
            return
        self._start_load(self.default, model_name, adapter, from_client=True)
        self.default.name = model_name

    def unload_default(self) -> concurrent.futures.Future[LoadedModel | None]:
        """The guide's unload: the default's model goes once its requests in flight finish; its slot stays."""
        return self.default.slot.unload()

    def _make_default(self, model_name: str, adapter: str | None) -> bool:
        """Make the resident model loaded from this source (and adapter) the default, as the guide's load of a
        model already resident does; False when there is none."""
        for resident in self.residents[1:]:
            state = resident.slot.state
            if state.loaded and state.model_name == model_name and state.adapter_path == adapter:
                previous = self.default
                self.residents.remove(resident)
                self.residents.insert(0, resident)
                if previous.model is None and not previous.slot.state.is_loading:
                    self.residents.remove(previous)  # an empty slot is not a model to list
                    asyncio.ensure_future(previous.scheduler.stop(timeout=None))
                return True
        return False

    def _new_resident(self, name: str, pinned: bool) -> Resident:
        limits = self._limits
        scheduler = Scheduler(
            max_concurrency=limits.max_concurrency,
            max_queue=limits.max_queue,
            max_rows_per_client=limits.max_rows_per_client,
        )
        slot = ModelSlot(self._backend, scheduler, self.policy, limits.load_timeout)
        resident = Resident(name, slot, scheduler, pinned)
        scheduler.kv_admission.allowance = lambda: self._kv_allowance(resident)
        if self._started:
            scheduler.start()
        return resident

    # -- life cycle --------------------------------------------------------------------------------
    def start(self, sweep_every: float = 1.0) -> None:
        self._started = True
        for resident in self.residents:
            resident.scheduler.start()
        loop = asyncio.get_running_loop()
        self._sweeper = loop.create_task(self._sweep(sweep_every))
        self._backend_watch = loop.create_task(self._watch_backend())

    async def stop(self, timeout: float | None) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._backend_watch is not None:
            self._backend_watch.cancel()
        await asyncio.gather(*(resident.scheduler.stop(timeout=timeout) for resident in self.residents))

    async def load_at_start(self, specs: tuple[str, ...], adapter: str | None, pinned: bool) -> None:
        """The operator's models: the first is the default (with --adapter), each loads in the background."""
        for number, spec in enumerate(specs):
            name, source = parse_model_spec(spec)
            if number == 0:
                self.default.name, self.default.pinned = name or source, pinned
                self._start_load(self.default, source, adapter)
            else:
                await self._add(name or source, source, None, pinned)

    # -- finding the model a request names ---------------------------------------------------------
    def find(self, requested: str) -> Resident | None:
        found = next((resident for resident in self.residents if resident.answers_to(requested)), None)
        if found is None:  # another spelling of a resident's local path (models//smol, ./models/smol/)?
            key = self._backend.describe_source(requested).key
            found = next((resident for resident in self.residents if resident.answers_to(requested, key)), None)
        return found

    def _named(self, name: str) -> Resident | None:
        return next((resident for resident in self.residents if resident.name == name), None)

    def sampling_defaults(self, resident: Resident) -> dict[str, float]:
        """The sampling a request to this model gets for the fields it leaves out: the operator's defaults for
        it over its own generation_config.json's."""
        operator = self._operator_sampling.get(resident.name)
        if operator is None and resident is self.default:
            operator = self._operator_sampling.get(DEFAULT_MODEL)
        own = resident.model.sampling_defaults if resident.model is not None else {}
        return {**own, **(operator or {})}

    def names(self) -> list[str]:
        return [resident.name for resident in self.residents if resident.model is not None]

    async def serving(
        self, requested: str | None, may_load: MayLoad, task: Task | None = "generate"
    ) -> tuple[Resident, LoadedModel]:
        """The resident model a request names (the default when it names none) and its loaded model, loading it
        first when it is allowed and the caller may load models; waits up to --model-load-wait for a load under
        way. No model for the default is the guide's 400, one loading its 503; a backend that cannot generate at
        all (a lost rank) is a 503; a model that does not do the task (an embedding model asked to generate, a
        generating model asked to embed) is a 400; task None: any model."""
        resident, model = await self._serving(requested, may_load)
        if task is not None and isinstance(model, EmbeddingModel) != (task == "embed"):
            does = "an embedding model: it does not generate" if task == "generate" else "not an embedding model"
            raise bad_request(f"The model '{resident.name}' is {does}", code="model_task_mismatch")
        return resident, model

    async def _serving(self, requested: str | None, may_load: MayLoad) -> tuple[Resident, LoadedModel]:
        unavailable = self._backend.unavailable()
        if unavailable is not None:
            raise service_unavailable(unavailable)
        if requested is None or self.default.answers_to(requested):
            return self.default, self.default.slot.require_model()
        resident = self.find(requested)
        if resident is None:
            resident = await self._load_on_demand(requested, may_load)
        if resident.slot.state.is_loading:
            await self._wait_for(resident)
        if resident.failed:  # kept a while after its load failed, so that requests learn why
            raise ApiError(
                404,
                f"The model '{requested}' could not be loaded: {resident.slot.state.error}",
                code="model_load_failed",
            )
        return resident, resident.slot.require_model()

    async def _load_on_demand(self, requested: str, may_load: MayLoad) -> Resident:
        if not self.policy.allow_patterns:
            raise self._not_served(requested)
        try:
            self.policy.require_allowed(requested)
        except ApiError:
            raise self._not_served(requested) from None
        if not await may_load():
            raise self._not_resident(requested, "; loading it needs the models:load scope")
        self.policy.check_target(requested, None)  # a missing path starts no load at all
        resident = self.find(requested)  # another request may have started it meanwhile
        if resident is not None:
            return resident
        return await self._add(requested, requested, None, pinned=False, from_client=True)

    def _not_served(self, requested: str) -> ApiError:
        """What a generation naming a model that is not resident (and will not be loaded) gets."""
        if not self.names() and not any(r.slot.state.is_loading for r in self.residents):
            return bad_request("No model loaded")  # as the guide's clients know it
        return self._not_resident(requested)

    def _not_resident(self, requested: str, why: str = "") -> ApiError:
        served = ", ".join(f"'{name}'" for name in self.names()) or "none"
        return ApiError(404, f"The model '{requested}' is not loaded{why}; resident models: {served}",
                        code="model_not_found")  # fmt: skip

    async def _wait_for(self, resident: Resident) -> None:
        deadline = time.monotonic() + self._limits.load_wait
        while resident.slot.state.is_loading and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if resident.slot.state.is_loading:
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
            state = existing.slot.state
            if (state.loaded or state.is_loading) and state.model_name == source and state.adapter_path == adapter:
                existing.pinned = existing.pinned or pinned
                return existing
            raise ApiError(409, f"A model named {name} is resident; unload it first", code="name_in_use")
        self.policy.check_target(source, adapter)
        return await self._add(name, source, adapter, pinned, from_client=True)

    async def _add(
        self, name: str, source: str, adapter: str | None, pinned: bool, from_client: bool = False
    ) -> Resident:
        described = self._backend.describe_source(source)
        await self._make_room(described.size_bytes, for_name=name)
        resident = self._new_resident(name, pinned)
        self.residents.append(resident)
        loop = asyncio.get_running_loop()
        future = self._start_load(resident, source, adapter, from_client, described)
        future.add_done_callback(lambda done: loop.call_soon_threadsafe(self._after_load, resident))
        return resident

    def _start_load(
        self,
        resident: Resident,
        source: str,
        adapter: str | None,
        from_client: bool = False,
        described: ModelSource | None = None,
    ) -> concurrent.futures.Future[LoadedModel | None]:
        future = resident.slot.start_load(source, adapter, from_client=from_client)
        resident.source_key = (described or self._backend.describe_source(source)).key
        return future

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
            await asyncio.wrap_future(self.unload_default())
            return
        await self._remove(resident)

    async def _remove(self, resident: Resident) -> None:
        if resident in self.residents:
            self.residents.remove(resident)
        await resident.scheduler.stop(timeout=None)  # finishes admitted work, then frees the model

    # -- the budget ----------------------------------------------------------------------------------
    def memory_in_use(self) -> int:
        return sum(resident.memory_bytes for resident in self.residents)

    def _kv_allowance(self, resident: Resident) -> int | None:
        """The bytes the budget leaves resident's KV caches: less its weights and every other model's memory."""
        if self.memory_budget is None:
            return None
        others = sum(r.memory_bytes for r in self.residents if r is not resident)
        return self.memory_budget - others - resident.weights_bytes

    def _count(self) -> int:
        return sum(1 for r in self.residents if r.model is not None or r.slot.state.is_loading)

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

    async def _watch_backend(self, every: float = 0.25) -> None:
        """Once the backend cannot generate at all (a lost rank), fail every request in flight with its 503 at
        once: their engine threads may never answer again."""
        while True:
            await asyncio.sleep(every)
            why = self._backend.unavailable()
            if why is not None:
                for resident in self.residents:
                    resident.scheduler.fail_in_flight(why)
                return

    async def _sweep(self, every: float) -> None:
        """Unload unpinned models idle for longer than their keep-alive (a request's, else --keep-alive)."""
        while True:
            await asyncio.sleep(every)
            now = time.time()
            for resident in list(self.residents):
                asked = resident.keep_alive
                limit = self.keep_alive if asked is None else asked
                if asked is None and limit == 0 or limit < 0 or not resident.unloadable:
                    continue  # --keep-alive 0: never; a request's 0: as soon as it is idle
                if now - resident.last_used >= limit:
                    why = "--keep-alive" if asked is None else "as a request's keep_alive asked"
                    logger.info("unloading %s: idle for %gs (%s)", resident.name, limit, why)
                    await self.unload(resident.name)
