"""The running server's parts, wired together once: settings, plugins, backend, scheduler, model manager.

Plugins receive this object in their hooks (as Datasette plugins receive ``datasette``)
and keep their own state in ``server.plugin_state[name]``.
"""

from __future__ import annotations

import logging
from typing import Any

import pluggy

from forgellm.core.api.pipeline import GenerationService
from forgellm.core.clients import InFlightLimit
from forgellm.core.config.settings import Settings, memory_amount
from forgellm.core.engine.backend import Backend
from forgellm.core.engine.scheduler import Scheduler
from forgellm.core.identity import LOAD, Identity
from forgellm.core.models.manager import ModelManager
from forgellm.core.models.registry import ModelRegistry, device_memory_bytes
from forgellm.core.models.sampling_defaults import operator_defaults
from forgellm.core.plugin_manager import await_me_maybe

logger = logging.getLogger("forgellm")


class BackendError(ValueError):
    """Two plugins register one backend name, or --backend names none that is registered."""


def collect_backends(pm: pluggy.PluginManager, settings: Settings) -> dict[str, Backend]:
    backends: dict[str, Backend] = {}

    def register(name: str, backend: Backend) -> None:
        if name in backends:
            raise BackendError(f"two plugins register a backend named {name!r}")
        backends[name] = backend

    pm.hook.register_backends(register=register, settings=settings)
    return backends


class Server:
    """One server: its settings, plugins, the backend serving its model, and the engine feeding on requests."""

    def __init__(self, settings: Settings, pm: pluggy.PluginManager) -> None:
        self.settings = settings
        self.pm = pm
        self.hook = pm.hook
        self.backends = collect_backends(pm, settings)
        if settings.backend not in self.backends:
            available = ", ".join(sorted(self.backends)) or "none (is a backend plugin disabled?)"
            raise BackendError(f"no backend named {settings.backend!r} is registered; registered: {available}")
        self.backend = self.backends[settings.backend]
        budget = settings.memory_budget
        self.registry = ModelRegistry(
            self.backend,
            max_concurrency=settings.max_concurrency,
            max_queue=settings.max_queue,
            max_rows_per_client=settings.max_rows_per_client,
            load_timeout=settings.load_timeout,
            allow_patterns=tuple(settings.allow_model),
            memory_budget=memory_amount(budget, device_memory_bytes(self.backend)) if budget else None,
            max_models=settings.max_models,
            keep_alive=settings.keep_alive,
            load_wait=settings.model_load_wait,
            authorized_to_load=self._may_load,
            sampling_defaults=operator_defaults(settings.model_sampling),
        )
        self.in_flight = InFlightLimit(settings.max_inflight_per_client)
        self.generations = GenerationService(self)
        self.plugin_state: dict[str, Any] = {}
        self.app: Any | None = None

    @property
    def models(self) -> ModelManager:
        """The default model's manager: the one the guide's routes speak of."""
        return self.registry.default.manager

    @property
    def scheduler(self) -> Scheduler:
        """The default model's scheduler."""
        return self.registry.default.scheduler

    async def allows(self, identity: Identity | None, action: str, request: Any) -> bool:
        """Whether the authorize hooks let this identity do the action: any one of them answering False forbids."""
        for verdict in self.hook.authorize(identity=identity, action=action, request=request, server=self):
            if await await_me_maybe(verdict) is False:
                return False
        return True

    async def _may_load(self, caller: Any) -> bool:
        """Whether a caller may load models (a request that names one not resident)."""
        return await self.allows(caller.identity, LOAD, caller.request)

    async def startup(self) -> None:
        self.registry.start()
        for result in self.hook.startup(server=self):
            await await_me_maybe(result)
        default = None if self.settings.no_model else self.backend.default_model
        models = tuple(self.settings.model) or ((default,) if default else ())
        await self.registry.load_at_start(models, self.settings.adapter, pinned=self.settings.pin_models)

    async def shutdown(self) -> None:
        for result in self.hook.shutdown(server=self):
            await await_me_maybe(result)
        await self.registry.stop(timeout=self.settings.drain_timeout)
