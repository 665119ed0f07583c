"""What a rank reports of itself in a heartbeat: the bytes its models' parts take and MLX's memory."""

from __future__ import annotations

from collections.abc import Iterable

import mlx.core as mx

from forgellm.backends.mlx.model import MlxModel

STATUS_FIELDS = ("weights_bytes", "memory_bytes", "peak_memory_bytes")


def local_numbers(models: Iterable[MlxModel]) -> list[int]:
    """This rank's STATUS_FIELDS."""
    return [sum(model.memory_bytes for model in list(models)), mx.get_active_memory(), mx.get_peak_memory()]
