"""A model sharded over several processes (ranks) with MLX's own distributed engine: ``mx.distributed``'s
collectives over the backend ``mlx.launch`` chose (ring over TCP, JACCL over Thunderbolt, MPI), mlx-lm's
sharded loading, and the launcher's hostfile. Rank 0 serves HTTP and leads (``leader``); the others follow
(``follower``); commands travel over the collectives (``channel``)."""

from __future__ import annotations

import os

import mlx.core as mx

# Set by mlx.launch (MLX_RANK: ring, JACCL, NCCL) or by an MPI launcher: this process is one of a group.
_LAUNCHER_VARIABLES = ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


def join_group() -> mx.distributed.Group | None:
    """The group this process was launched into, joined (waits for every rank); None when it runs alone."""
    if not any(name in os.environ for name in _LAUNCHER_VARIABLES):
        return None
    group = mx.distributed.init(strict=True)
    return group if group.size() > 1 else None
