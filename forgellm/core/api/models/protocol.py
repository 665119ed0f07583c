"""The resident-models routes' wire format (``/api/models``), in the guide's envelope."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

NonEmptyStr = Annotated[str, msgspec.Meta(min_length=1)]
ModelName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")]


class CacheTier(msgspec.Struct):
    bytes: int
    entries: int
    hits: int  # prompts that took their cached prefix from this tier
    hit_rate: float | None  # hits of all prompts looked up; null before the first


class KvCache(msgspec.Struct):
    bytes_per_token: int  # one position of one sequence (0: not known for this model)
    in_use: int  # the running batch's KV cache
    reserved: int  # what the running sequences may grow to: admission counts this against --memory-budget
    lookups: int  # prompts looked up in the prompt cache
    memory_tier: CacheTier  # the prompt cache in memory
    disk_tier: CacheTier  # the prompt cache on disk (--prompt-cache-dir)


class ResidentModel(msgspec.Struct):
    name: str  # what a request's `model` field names it by
    model_name: str | None  # what was loaded: a built-in name, a path, a repo id
    adapter_path: str | None
    state: Literal["loading", "loaded", "failed", "unloaded"]
    error: str | None
    progress: str | None
    memory_bytes: int  # weights and KV caches: held, or reserved by running sequences, whichever is more
    kv_cache: KvCache
    last_used: float  # Unix time of the last request (or the load)
    pinned: bool  # never unloaded to make room, nor when idle
    default: bool  # the model the guide's routes and requests without `model` get
    in_flight: int  # requests queued or generating
    active_sequences: int
    queued_sequences: int  # admitted, waiting for a batch slot
    load_seconds: float | None
    # What a request that leaves these sampling fields out gets: the operator's defaults for the model over
    # its generation_config.json's (fields absent here take the API dialect's default).
    sampling_defaults: dict[str, float]
    # An embedding model's vector length (it serves /v1/embeddings, not generation); None: a model that generates.
    embedding_dimensions: int | None = None


class RankInfo(msgspec.Struct):
    """One process of models sharded over several (mlx.launch's ranks), as it last reported (every second)."""

    rank: int
    host: str
    weights_bytes: int  # its part of the models' weights
    memory_bytes: int  # the memory its framework holds
    peak_memory_bytes: int
    sequences: int  # the sequences its engines hold (rank 0's count, on every rank, when they agree)


class ModelsResponse(msgspec.Struct):
    success: bool
    models: list[ResidentModel]
    memory_in_use: int
    memory_budget: int | None  # --memory-budget in bytes; null: none
    max_models: int  # 0: no limit
    ranks: list[RankInfo]  # the processes the models are sharded over, this server (rank 0) first; []: one
    ranks_error: str | None  # why the ranks cannot generate (one was lost); null: they can


class ModelLoadRequest(msgspec.Struct, forbid_unknown_fields=True):
    model_name: NonEmptyStr  # a built-in name, a GGUF file, an MLX directory or a repo id
    name: ModelName | None = None  # what requests call it; default: model_name
    adapter_path: NonEmptyStr | None = None
    pin: bool = False


class ModelUnloadRequest(msgspec.Struct, forbid_unknown_fields=True):
    name: NonEmptyStr


class ModelActionResponse(msgspec.Struct):
    success: bool
    message: str
    name: str
