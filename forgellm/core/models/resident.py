"""One model the server holds (or is loading): its slot, its batch, and what the registry decides with."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

from forgellm.core.engine.backend import LoadedModel
from forgellm.core.engine.scheduler import Scheduler
from forgellm.core.models.slot import ModelSlot

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")


def parse_model_spec(spec: str) -> tuple[str | None, str]:
    """``coder=PATH`` as ("coder", "PATH"); a bare source has no name of its own."""
    name, equals, source = spec.partition("=")
    if equals and _NAME.match(name) and source:
        return name, source
    return None, spec


@dataclass
class Resident:
    """One model the server holds (or is loading), known to requests by ``name``, its source by ``source_key``
    (one key for every spelling of a local path, as the backend describes it)."""

    name: str
    slot: ModelSlot
    scheduler: Scheduler
    pinned: bool
    source_key: str | None = None
    last_used: float = field(default_factory=time.time)
    pending: int = 0  # requests that chose this model and are not yet in its queue
    # Seconds it may sit idle before it is unloaded, as a request last asked (Ollama's keep_alive); negative:
    # never; None: the server's --keep-alive. A pinned model stays whatever a request asks.
    keep_alive: float | None = None

    @property
    def model(self) -> LoadedModel | None:
        return self.slot.current

    @property
    def busy(self) -> bool:
        return self.pending > 0 or self.scheduler.in_flight > 0

    @property
    def unloadable(self) -> bool:
        """Whether the registry may unload it on its own (to make room, or idle): loaded, unpinned, idle."""
        return self.model is not None and not self.pinned and not self.busy

    @property
    def failed(self) -> bool:
        """Its load failed: it holds no model, and its error says why."""
        state = self.slot.state
        return self.model is None and not state.is_loading and state.error is not None

    @property
    def weights_bytes(self) -> int:
        model = self.model
        return model.memory_bytes if model is not None else 0

    @property
    def memory_bytes(self) -> int:
        """Its weights and its KV caches: what the engine holds, or what its running sequences may grow to beside
        its prompt cache, whichever is more."""
        scheduler = self.scheduler
        kv = max(scheduler.cache_bytes, scheduler.kv_reserved + scheduler.cache_stats.memory_bytes)
        return self.weights_bytes + kv

    def answers_to(self, requested: str, requested_key: str | None = None) -> bool:
        """Whether a request naming ``requested`` (whose source key is requested_key) means this model."""
        state = self.slot.state
        if requested in (self.name, state.model_name) or (self.model is not None and requested == self.model.name):
            return True
        return requested_key is not None and requested_key == self.source_key

    def touch(self) -> None:
        self.last_used = time.time()
