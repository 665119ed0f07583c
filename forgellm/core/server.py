"""The running server's parts, wired together once: settings, plugins, backend, scheduler, model manager.

Plugins receive this object in their hooks (as Datasette plugins receive ``datasette``)
and keep their own state in ``server.plugin_state[name]``.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import pluggy

from forgellm.backends.base import Backend
from forgellm.core.clients import InFlightLimit
from forgellm.core.model_manager import ModelManager
from forgellm.core.plugins import await_me_maybe
from forgellm.core.scheduler import Scheduler
from forgellm.core.settings import Settings

logger = logging.getLogger("forgellm")

DEFAULT_BACKEND = "mlx"


class DuplicateBackend(ValueError):
    pass


def collect_backends(pm: pluggy.PluginManager) -> dict[str, Backend]:
    backends: dict[str, Backend] = {}

    def register(name: str, backend: Backend) -> None:
        if name in backends:
            raise DuplicateBackend(f"two plugins register a backend named {name!r}")
        backends[name] = backend

    pm.hook.register_backends(register=register)
    return backends


class Server:
    def __init__(self, settings: Settings, pm: pluggy.PluginManager) -> None:
        self.settings = settings
        self.pm = pm
        self.hook = pm.hook
        self.backends = collect_backends(pm)
        if DEFAULT_BACKEND not in self.backends:
            raise ValueError(f"no {DEFAULT_BACKEND!r} backend is registered; is the mlx plugin disabled?")
        self.scheduler = Scheduler(max_concurrency=settings.max_concurrency, max_queue=settings.max_queue)
        self.backend = self.backends[DEFAULT_BACKEND]
        self.models = ModelManager(self.backend, self.scheduler, settings.load_timeout, settings.allow_model)
        self.in_flight = InFlightLimit(settings.max_inflight_per_client)
        self.plugin_state: dict[str, Any] = {}
        self.app: Optional[Any] = None

    async def startup(self) -> None:
        self.scheduler.start()
        for result in self.hook.startup(server=self):
            await await_me_maybe(result)
        model = self.settings.model or (None if self.settings.no_model else getattr(self.backend, "default_model", None))
        if model:
            self.models.start_load(model, self.settings.adapter)

    async def shutdown(self) -> None:
        for result in self.hook.shutdown(server=self):
            await await_me_maybe(result)
        await self.scheduler.stop(timeout=self.settings.drain_timeout)
