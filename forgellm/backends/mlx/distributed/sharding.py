"""Which part of a model each rank holds: mlx-lm's tensor or pipeline sharding, chosen and checked before any
rank loads a weight, so that a model that cannot be split as asked is a load error that says why (rather than
a shape error deep inside attention, or ranks left waiting on each other)."""

from __future__ import annotations

import json
import logging
import pathlib
from dataclasses import dataclass
from typing import Any, Literal

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.utils import load_model, sharded_load

from forgellm.backends.mlx.sources.weights_file import WEIGHT_INDEX

logger = logging.getLogger("forgellm.distributed")

PARALLEL_CHOICES = ("auto", "tensor", "pipeline")

Split = Literal["tensor", "pipeline"]


class ShardingRefused(ValueError):
    """The model cannot be split over the group as asked; the message says why."""


@dataclass(frozen=True)
class Sharding:
    """How a model is split over the group (``parallel``: tensor, pipeline or auto)."""

    group: mx.distributed.Group
    parallel: str = "auto"

    @property
    def ranks(self) -> int:
        return self.group.size()

    def plan(self, directory: pathlib.Path) -> Split:
        """The split this model takes over the group; ShardingRefused when there is none (reads the config and
        the model's classes only, no weights)."""
        config = _config(directory)
        model, _ = load_model(directory, lazy=True, strict=False)
        tensor_problem = self._tensor_problem(model, config)
        pipeline_problem = self._pipeline_problem(model, directory)
        if self.parallel == "tensor" or (self.parallel == "auto" and tensor_problem is None):
            if tensor_problem is not None:
                raise ShardingRefused(f"cannot split the model over {self.ranks} ranks by tensor: {tensor_problem}")
            return "tensor"
        if pipeline_problem is None:
            return "pipeline"
        if self.parallel == "pipeline":
            raise ShardingRefused(f"cannot split the model over {self.ranks} ranks by pipeline: {pipeline_problem}")
        raise ShardingRefused(
            f"cannot split the model over {self.ranks} ranks: by tensor, {tensor_problem}; by pipeline, "
            f"{pipeline_problem}"
        )

    def _tensor_problem(self, model: nn.Module, config: dict[str, Any]) -> str | None:
        if not hasattr(model, "shard"):
            return f"mlx-lm has no tensor parallelism for {config.get('model_type')!r} models"
        heads = config.get("num_attention_heads")
        kv_heads = config.get("num_key_value_heads", heads)
        for what, count in (("attention heads", heads), ("KV heads", kv_heads)):
            if isinstance(count, int) and count % self.ranks:
                return (
                    f"its {count} {what} do not divide by {self.ranks} (it has {heads} attention heads and "
                    f"{kv_heads} KV heads; use a rank count that divides both, or --parallel pipeline)"
                )
        return None

    def _pipeline_problem(self, model: nn.Module, directory: pathlib.Path) -> str | None:
        inner = getattr(model, "model", None)
        if not hasattr(inner, "pipeline"):
            return f"mlx-lm has no pipeline parallelism for {_config(directory).get('model_type')!r} models"
        if not (directory / WEIGHT_INDEX).is_file():
            return f"the model directory has no {WEIGHT_INDEX} (which file holds each layer's weights)"
        layers = len(getattr(inner, "layers", ()))
        if layers < self.ranks:
            return f"it has {layers} layers, fewer than the {self.ranks} ranks"
        return None

    def load(self, directory: pathlib.Path, tokenizer_config: dict[str, Any] | None) -> tuple[nn.Module, Any]:
        """This rank's part of the model, and the tokenizer (every rank calls it at once: it ends in a
        collective)."""
        split = self.plan(directory)
        logger.info("rank %d of %d: loading %s (%s parallel)", self.group.rank(), self.ranks, directory, split)
        groups: dict[str, Any] = {f"{split}_group": self.group}
        model, tokenizer = sharded_load(str(directory), tokenizer_config=tokenizer_config, **groups)
        return model, tokenizer


def _config(directory: pathlib.Path) -> dict[str, Any]:
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ShardingRefused(f"cannot read {directory / 'config.json'}: {exc}") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ShardingRefused(f"{directory / 'config.json'} names no model_type")
    return config
