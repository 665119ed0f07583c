"""``/api/models``: every resident model with its state, and loading or unloading one by name.

The guide's ``/api/model/...`` routes keep their meaning (they speak of the default model); these
list and manage all of them, in the guide's envelope.
"""

from __future__ import annotations

import dataclasses

from litestar import get
from litestar.di import NamedDependency

from forgellm.core.api.guide.routes import guide_errors
from forgellm.core.api.models.protocol import (
    CacheTier,
    KvCache,
    ModelActionResponse,
    ModelLoadRequest,
    ModelsResponse,
    ModelUnloadRequest,
    RankInfo,
    ResidentModel,
)
from forgellm.core.engine.backend import EmbeddingModel
from forgellm.core.http.json_route import json_post
from forgellm.core.identity import LOAD, STATUS
from forgellm.core.models.registry import ModelRegistry
from forgellm.core.models.resident import Resident
from forgellm.core.server import Server


def resident_model(resident: Resident, registry: ModelRegistry) -> ResidentModel:
    """A resident model as /api/models (and the console) describe it."""
    state = resident.slot.state
    if state.is_loading:
        kind = "loading"
    elif state.loaded:
        kind = "loaded"
    else:
        kind = "failed" if state.error else "unloaded"
    return ResidentModel(
        name=resident.name,
        model_name=state.model_name,
        adapter_path=state.adapter_path,
        state=kind,  # type: ignore[arg-type]
        error=state.error,
        progress=state.progress,
        memory_bytes=resident.memory_bytes,
        kv_cache=kv_cache(resident),
        last_used=resident.last_used,
        pinned=resident.pinned,
        default=resident is registry.default,
        in_flight=resident.scheduler.in_flight,
        active_sequences=resident.scheduler.active_count,
        queued_sequences=resident.scheduler.waiting_count,
        load_seconds=state.load_seconds,
        sampling_defaults=registry.sampling_defaults(resident),
        embedding_dimensions=model.dimensions if isinstance(model := resident.model, EmbeddingModel) else None,
    )


def kv_cache(resident: Resident) -> KvCache:
    stats, scheduler = resident.scheduler.cache_stats, resident.scheduler

    def tier(nbytes: int, entries: int, hits: int) -> CacheTier:
        return CacheTier(nbytes, entries, hits, hits / stats.lookups if stats.lookups else None)

    return KvCache(
        bytes_per_token=stats.kv_bytes_per_token,
        in_use=stats.kv_in_use,
        reserved=scheduler.kv_reserved,
        lookups=stats.lookups,
        memory_tier=tier(stats.memory_bytes, stats.memory_entries, stats.memory_hits),
        disk_tier=tier(stats.disk_bytes, stats.disk_entries, stats.disk_hits),
    )


@get("/api/models", opt={"action": STATUS}, summary="Every resident model", responses=guide_errors(401, 403))
async def list_models(server: NamedDependency[Server]) -> ModelsResponse:
    registry = server.registry
    return ModelsResponse(
        success=True,
        models=[resident_model(resident, registry) for resident in registry.residents],
        memory_in_use=registry.memory_in_use(),
        memory_budget=registry.memory_budget,
        max_models=registry.max_models,
        ranks=[RankInfo(**dataclasses.asdict(rank)) for rank in server.backend.ranks()],
        ranks_error=server.backend.unavailable(),
    )


@json_post(
    "/api/models/load",
    ModelLoadRequest,
    opt={"action": LOAD},
    status_code=200,
    summary="Start loading a model under a name, beside the others",
    responses=guide_errors(400, 401, 403, 409, 413, 415, 503),
)
async def load_named_model(data: ModelLoadRequest, server: NamedDependency[Server]) -> ModelActionResponse:
    name = data.name or data.model_name
    await server.registry.load(name, data.model_name, data.adapter_path, data.pin)
    return ModelActionResponse(success=True, message=f"Model {data.model_name} loading as {name}", name=name)


@json_post(
    "/api/models/unload",
    ModelUnloadRequest,
    opt={"action": LOAD},
    status_code=200,
    summary="Unload a model by name, once its requests in flight finish",
    responses=guide_errors(400, 401, 403, 404, 413, 415),
)
async def unload_named_model(data: ModelUnloadRequest, server: NamedDependency[Server]) -> ModelActionResponse:
    await server.registry.unload(data.name)
    return ModelActionResponse(success=True, message=f"Model {data.name} unloaded", name=data.name)


ROUTES = [list_models, load_named_model, unload_named_model]
