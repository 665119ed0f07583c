"""What the event loop asks of the engine thread: one typed command per kind, put on the scheduler's inbox."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from dataclasses import dataclass

from forgellm.core.engine.backend import LoadedModel
from forgellm.core.engine.embedding_batch import EmbeddingWork
from forgellm.core.engine.generation import GenerationJob

# Loads the next model on the engine thread; None unloads.
ModelLoader = Callable[[], LoadedModel | None]


@dataclass(frozen=True)
class Add:
    """Queue a sequence for the batch."""

    seq_id: int
    job: GenerationJob


@dataclass(frozen=True)
class Embed:
    """Queue an embedding request's inputs for the next forward passes."""

    work: EmbeddingWork


@dataclass(frozen=True)
class Cancel:
    """Drop a sequence, queued or running (its client left or timed out)."""

    seq_id: int


@dataclass(frozen=True)
class Swap:
    """Replace the model once the work already admitted has finished; the future gets the new model."""

    load: ModelLoader
    future: concurrent.futures.Future[LoadedModel | None]


@dataclass(frozen=True)
class Stop:
    """Finish the admitted work, free the model and end the engine thread."""


Command = Add | Embed | Cancel | Swap | Stop
