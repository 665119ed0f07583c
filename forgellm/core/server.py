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
from forgellm.core.config.settings import Settings
from forgellm.core.engine.backend import Backend
from forgellm.core.engine.scheduler import Scheduler
from forgellm.core.models.manager import ModelManager
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
        self.scheduler = Scheduler(max_concurrency=settings.max_concurrency, max_queue=settings.max_queue)
        self.models = ModelManager(self.backend, self.scheduler, settings.load_timeout, settings.allow_model)
        self.in_flight = InFlightLimit(settings.max_inflight_per_client)
        self.generations = GenerationService(self)
        self.plugin_state: dict[str, Any] = {}
        self.app: Any | None = None

    async def startup(self) -> None:
        self.scheduler.start()
        for result in self.hook.startup(server=self):
            await await_me_maybe(result)
        model = self.settings.model or (None if self.settings.no_model else self.backend.default_model)
        if model:
            self.models.start_load(model, self.settings.adapter)

    async def shutdown(self) -> None:
        for result in self.hook.shutdown(server=self):
            await await_me_maybe(result)
        await self.scheduler.stop(timeout=self.settings.drain_timeout)
