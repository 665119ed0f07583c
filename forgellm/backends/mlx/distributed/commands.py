"""What rank 0 tells the other ranks, one type per kind: every engine operation that computes, and the model
loads and unloads around them, in the order rank 0 does them."""

from __future__ import annotations

from dataclasses import dataclass

from forgellm import GenerationJob


@dataclass(frozen=True)
class LoadModel:
    """Load this model's part (every rank first checks it can, then loads; both steps end in a vote)."""

    model_id: int
    name: str


@dataclass(frozen=True)
class CloseModel:
    model_id: int


@dataclass(frozen=True)
class CreateEngine:
    """A fresh engine; ``seed`` is the random state every rank starts it from, so sampling draws alike."""

    model_id: int
    engine_id: int
    max_batch_size: int
    seed: int


@dataclass(frozen=True)
class CloseEngine:
    engine_id: int


@dataclass(frozen=True)
class AddSequence:
    """Start a sequence as rank 0 did: its prompt cache held ``entries`` entries when it looked the prompt up
    (a rank with more drops its oldest first), and it found ``cached`` tokens there (a rank that finds another
    count has diverged)."""

    engine_id: int
    seq_id: int
    job: GenerationJob
    entries: int
    cached: int


@dataclass(frozen=True)
class RemoveSequences:
    engine_id: int
    seq_ids: tuple[int, ...]


@dataclass(frozen=True)
class Step:
    engine_id: int


@dataclass(frozen=True)
class Heartbeat:
    """Rank 0 is alive; when ``report``, every rank then gives its status. Rank 0 sends nothing more for
    ``pause`` seconds, and the others sleep that long: MLX's collectives wait by spinning a core, which an idle
    group would otherwise do without end."""

    pause: float
    report: bool


@dataclass(frozen=True)
class Shutdown:
    """The server stopped: every rank exits."""


Command = (
    LoadModel | CloseModel | CreateEngine | CloseEngine | AddSequence | RemoveSequences | Step | Heartbeat | Shutdown
)
