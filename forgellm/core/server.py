"""The composition root: the running server's parts wired together once (settings, plugins, backend, the
registry of resident models, the generation pipeline).

Plugins receive this object in their hooks (as Datasette plugins receive ``datasette``)
and keep their own state in ``server.plugin_state[name]``.
"""

from __future__ import annotations

import logging
from typing import Any

import pluggy

from forgellm.core.api.admission import Admission
from forgellm.core.api.pipeline import GenerationLimits, GenerationService
from forgellm.core.api.request import Caller
from forgellm.core.clients import InFlightLimit
from forgellm.core.config.core_settings import CoreSettings
from forgellm.core.config.settings import Settings, memory_amount
from forgellm.core.engine.backend import Backend
from forgellm.core.identity import LOAD, Identity
from forgellm.core.models.policy import LoadPolicy
from forgellm.core.models.registry import ModelRegistry, RegistryLimits, device_memory_bytes
from forgellm.core.models.resident import Resident
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
    """One server: its settings, plugins, the backend serving its models, the registry of resident models, and
    the generation pipeline, wired together here and nowhere else."""

    def __init__(self, settings: Settings, pm: pluggy.PluginManager) -> None:
        self.settings = settings  # every option's value, the plugins' included
        self.config = config = CoreSettings.of(settings)  # the core's own, typed
        self.pm = pm
        self.hook = pm.hook
        self.backends = collect_backends(pm, settings)
        if config.backend not in self.backends:
            available = ", ".join(sorted(self.backends)) or "none (is a backend plugin disabled?)"
            raise BackendError(f"no backend named {config.backend!r} is registered; registered: {available}")
        self.backend = self.backends[config.backend]
        budget = config.memory_budget
        self.registry = ModelRegistry(
            self.backend,
            LoadPolicy(self.backend, config.allow_model),
            RegistryLimits(
                max_concurrency=config.max_concurrency,
                max_queue=config.max_queue,
                max_rows_per_client=config.max_rows_per_client,
                memory_budget=memory_amount(budget, device_memory_bytes(self.backend)) if budget else None,
                max_models=config.max_models,
                keep_alive=config.keep_alive,
                load_wait=config.model_load_wait,
                load_timeout=config.load_timeout,
            ),
            operator_defaults(config.model_sampling),
        )
        self.in_flight = InFlightLimit(config.max_inflight_per_client)
        self.generations = GenerationService(
            self.registry,
            Admission(self.in_flight, self.hook, self),
            GenerationLimits(
                max_tokens_cap=config.max_tokens_cap,
                max_request_tokens=config.max_request_tokens,
                max_prompt_tokens=config.max_prompt_tokens,
                max_embedding_tokens=config.max_embedding_tokens,
                template_timeout=config.template_timeout,
                request_timeout=config.request_timeout,
            ),
            self._may_load,
        )
        self.plugin_state: dict[str, Any] = {}
        self.app: Any | None = None

    @property
    def default_model(self) -> Resident:
        """The default model (its slot, its batch): the one the guide's routes speak of."""
        return self.registry.default

    async def allows(self, identity: Identity | None, action: str, request: Any) -> bool:
        """Whether the authorize hooks let this identity do the action: any one of them answering False forbids."""
        for verdict in self.hook.authorize(identity=identity, action=action, request=request, server=self):
            if await await_me_maybe(verdict) is False:
                return False
        return True

    async def _may_load(self, caller: Caller) -> bool:
        """Whether a caller may load models (a request that names one not resident)."""
        return await self.allows(caller.identity, LOAD, caller.request)

    async def startup(self) -> None:
        self.registry.start()
        for result in self.hook.startup(server=self):
            await await_me_maybe(result)
        config = self.config
        default = None if config.no_model else self.backend.default_model
        models = config.model or ((default,) if default else ())
        await self.registry.load_at_start(models, config.adapter, pinned=config.pin_models)

    async def shutdown(self) -> None:
        for result in self.hook.shutdown(server=self):
            await await_me_maybe(result)
        # A backend that cannot generate any more (a lost rank) may have left an engine thread waiting for good.
        unavailable = self.backend.unavailable() is not None
        await self.registry.stop(timeout=1.0 if unavailable else self.config.drain_timeout)
        self.backend.close()
