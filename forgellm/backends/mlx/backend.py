"""The MLX backend: loads models with mlx-lm, after fetching a built-in name and converting a GGUF file."""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
from collections.abc import Callable, Iterable

import click
import mlx.core as mx

from forgellm import Backend, LoadedModel, ModelSource, Rank, Settings, parse_model_spec
from forgellm.backends.mlx.batch_engine import EngineTuning
from forgellm.backends.mlx.distributed import join_group
from forgellm.backends.mlx.distributed.leader import Timeouts
from forgellm.backends.mlx.distributed.serving import DistributedServing
from forgellm.backends.mlx.draft_policy import SpeculationSettings
from forgellm.backends.mlx.embedding_model import MlxEmbeddingModel, is_embedding_model
from forgellm.backends.mlx.model import MlxModel
from forgellm.backends.mlx.options import ModelKvBits
from forgellm.backends.mlx.quantized_kv import KvQuantization
from forgellm.backends.mlx.sources import ModelSources
from forgellm.backends.mlx.sources.builtin_models import BUILTIN_MODELS, DEFAULT_MODEL
from forgellm.backends.mlx.sources.model_cache import default_cache_dir
from forgellm.backends.mlx.sources.model_files import check_model_directory

logger = logging.getLogger("forgellm.mlx")


class MlxBackend(Backend):
    """Loads models with mlx-lm (after fetching a built-in name and converting a GGUF file)."""

    default_model: str | None = DEFAULT_MODEL

    def __init__(
        self,
        tuning: EngineTuning | None = None,
        sources: ModelSources | None = None,
        tool_parser: str | None = None,
        draft_model: str | None = None,
        kv_bits_by_model: dict[str, int] | None = None,
        kv_group_size: int | None = None,
        quantized_kv_start: int = 0,
        distributed: DistributedServing | None = None,
    ) -> None:
        self.tuning = tuning or EngineTuning()
        self.kv_bits_by_model = kv_bits_by_model or {}  # by source (what load() is given); 0: the model's dtype
        self.kv_group_size = kv_group_size  # for a model's own --model-kv-bits (None: by its bits)
        self.quantized_kv_start = quantized_kv_start
        self.sources = sources or ModelSources()
        self.tool_parser = tool_parser
        self.draft_model = draft_model
        self.distributed = distributed  # None: this process serves its models alone

    @classmethod
    def from_settings(cls, settings: Settings) -> MlxBackend:
        """The backend the MLX plugin's options (forgellm/backends/mlx/options.py) describe."""
        if settings["prompt_cache_dir"] and settings["prompt_cache_size"] == 0:
            # The disk tier is fed by the memory tier: without it the folder would silently stay empty.
            raise click.UsageError("--prompt-cache-dir needs the prompt cache in memory: a --prompt-cache-size above 0")
        cache_dir = settings["cache_dir"]
        group = join_group()
        if group is not None and settings["prompt_cache_dir"]:
            raise click.UsageError(
                "--prompt-cache-dir is not available under mlx.launch: every rank would need its own disk tier, "
                "found alike (the memory tier works)"
            )
        distributed = None
        if group is not None:
            timeouts = Timeouts(rank=settings["rank_timeout"], load=settings["load_timeout"] or None)
            distributed = DistributedServing(group, settings["parallel"], timeouts, settings["drain_timeout"])
        return cls(
            EngineTuning(
                prompt_cache_size=settings["prompt_cache_size"],
                prompt_cache_bytes=settings["prompt_cache_bytes"],
                prompt_cache_dir=settings["prompt_cache_dir"],
                prompt_cache_disk_bytes=settings["prompt_cache_disk_bytes"],
                prefill_batch_size=settings["prefill_batch_size"],
                prefill_chunk_size=settings["prefill_chunk_size"],
                speculation=SpeculationSettings(
                    enabled=settings["speculation"] != "off",
                    prompt_lookup=settings["speculation"] == "prompt-lookup",
                    max_draft_tokens=settings["num_draft_tokens"],
                    position_cost=settings["draft_position_cost"],
                ),
                kv_quantization=KvQuantization.chosen(
                    settings["kv_bits"], settings["kv_group_size"], settings["quantized_kv_start"]
                ),
            ),
            ModelSources(pathlib.Path(cache_dir) if cache_dir else default_cache_dir(), settings["gguf_weights"]),
            settings["tool_parser"],
            settings["draft_model"],
            kv_bits_by_source(settings["model_kv_bits"], settings["model"]),
            settings["kv_group_size"],
            settings["quantized_kv_start"],
            distributed,
        )

    def device_memory_bytes(self) -> int:
        """What a --memory-budget fraction is of on a GPU: its memory; 0 on the CPU, where the core takes the
        machine's."""
        if mx.default_device().type != mx.DeviceType.gpu:
            return 0
        return int(mx.device_info().get("memory_size", 0))

    def describe_source(self, name: str) -> ModelSource:
        """Built-in names and GGUF files beside what the core knows (directories and repo ids)."""
        if name in BUILTIN_MODELS:
            return ModelSource("name", "Built-in model", True, 0, name)
        if name.lower().endswith(".gguf"):
            path = pathlib.Path(os.path.expanduser(name))
            try:
                exists = path.is_file()
                return ModelSource("file", "GGUF file", exists, path.stat().st_size if exists else 0,
                                   os.path.realpath(path) if exists else name)  # fmt: skip
            except (OSError, ValueError):
                return ModelSource("file", "GGUF file", False, 0, name)
        return super().describe_source(name)

    def load(self, model_name: str, adapter_path: str | None, progress: Callable[[str], None]) -> LoadedModel:
        distributed = self.distributed
        if distributed is None:
            return self._load_alone(model_name, adapter_path, progress)
        if adapter_path is not None:
            raise ValueError("adapters are not available for a model sharded over ranks (mlx-lm shards base models)")

        if self.draft_model is not None and self.tuning.speculation.enabled:
            raise ValueError("--draft-model is not available for a model sharded over ranks; prompt lookup is")
        progress(f"loading this model's part on each of {distributed.sharding.ranks} ranks")
        return distributed.load(
            model_name,
            lambda: self._prepare_part(model_name, progress),
            lambda path: self._load_part(model_name, path),
        )

    def follow(self) -> int | None:
        if self.distributed is None or self.distributed.rank == 0:
            return None

        def prepare(model_name: str) -> pathlib.Path:
            return self._prepare_part(model_name, lambda text: logger.info("%s: %s", model_name, text))

        def build(model_name: str, path: pathlib.Path) -> MlxModel:
            return self._load_part(model_name, path, follower=True)

        return self.distributed.follow(prepare, build)

    def pullable(self) -> dict[str, str]:
        return {name: model.description for name, model in BUILTIN_MODELS.items()}

    def pull(self, name: str, progress: Callable[[str], None]) -> None:
        if name not in BUILTIN_MODELS:
            raise ValueError(f"{name} is not a built-in model; built-in: {', '.join(BUILTIN_MODELS)}")
        self.sources.resolve(name, progress)

    def ranks(self) -> tuple[Rank, ...]:
        return self.distributed.ranks() if self.distributed is not None else ()

    def unavailable(self) -> str | None:
        return self.distributed.unavailable() if self.distributed is not None else None

    def close(self) -> None:
        if self.distributed is not None:
            self.distributed.close()

    def _prepare_part(self, model_name: str, progress: Callable[[str], None]) -> pathlib.Path:
        """Find this rank's copy of the model and check that it splits as asked (no weights loaded yet)."""
        assert self.distributed is not None
        path = pathlib.Path(os.path.expanduser(self.sources.resolve(model_name, progress)))
        if not path.is_dir():
            raise ValueError(f"{model_name}: a model sharded over ranks needs a local model directory, not {path}")
        check_model_directory(str(path))
        if is_embedding_model(path):
            raise ValueError(f"{model_name} is an embedding model: it is not sharded over ranks; serve it alone")
        self.distributed.sharding.plan(path)
        return path

    def _load_part(self, model_name: str, path: pathlib.Path, follower: bool = False) -> MlxModel:
        assert self.distributed is not None
        tuning = self._tuning_for(model_name)
        if follower:  # its prompt cache drops what rank 0's drops, whatever the bytes (AddSequence.entries)
            tuning = dataclasses.replace(tuning, prompt_cache_bytes=0)
        return MlxModel(
            model_name, None, tuning, path=str(path), tool_parser=self.tool_parser,
            sharding=self.distributed.sharding,
        )  # fmt: skip

    def _load_alone(
        self, model_name: str, adapter_path: str | None, progress: Callable[[str], None]
    ) -> MlxModel | MlxEmbeddingModel:
        path = self.sources.resolve(model_name, progress)
        for directory in (path, adapter_path):
            if directory is not None and os.path.isdir(os.path.expanduser(directory)):
                check_model_directory(os.path.expanduser(directory))
        local = pathlib.Path(os.path.expanduser(path))
        if local.is_dir() and is_embedding_model(local):
            if adapter_path is not None:
                raise ValueError(f"{model_name} is an embedding model: adapters are for generating models")
            progress("loading the embedding model's weights")
            return MlxEmbeddingModel(model_name, local)
        draft = None
        if self.draft_model is not None and self.tuning.speculation.enabled:
            draft = self.sources.resolve(self.draft_model, lambda text: progress(f"draft model: {text}"))
        progress("loading weights")
        return MlxModel(
            model_name, adapter_path, self._tuning_for(model_name), path=path, tool_parser=self.tool_parser,
            draft_path=draft,
        )  # fmt: skip

    def _tuning_for(self, model_name: str) -> EngineTuning:
        """The tuning, with the model's own --model-kv-bits where it has one."""
        bits = self.kv_bits_by_model.get(model_name)
        if bits is None:
            return self.tuning
        form = KvQuantization.chosen(bits, self.kv_group_size, self.quantized_kv_start)
        return dataclasses.replace(self.tuning, kv_quantization=form)


def kv_bits_by_source(specs: Iterable[str], models: Iterable[str]) -> dict[str, int]:
    """--model-kv-bits by source: a served name of --model NAME=SOURCE stands for its source."""
    sources = {name: source for name, source in map(parse_model_spec, models) if name is not None}
    parsed = (ModelKvBits.parse(spec) for spec in specs)
    return {sources.get(name, name): bits for name, bits in parsed}
