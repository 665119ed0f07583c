"""What a rank reports of itself in a heartbeat: the bytes its models' parts take, MLX's memory, and the
sequences its engines hold."""

from __future__ import annotations

from collections.abc import Iterable

import mlx.core as mx

from forgellm import Engine
from forgellm.backends.mlx.model import MlxModel


def local_numbers(models: Iterable[MlxModel], engines: Iterable[Engine]) -> list[int]:
    """This rank's status, as forgellm.Rank's fields after its rank and host."""
    weights = sum(model.memory_bytes for model in list(models))
    return [weights, mx.get_active_memory(), mx.get_peak_memory(), sum(len(engine) for engine in list(engines))]
