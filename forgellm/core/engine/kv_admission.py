"""Admission by KV bytes: a sequence joins the batch only when the batch's KV cache, with it in, fits the bytes
--memory-budget leaves this model.

Each sequence is counted at its prompt plus its max_tokens, the most it can grow to, in the engine's own bytes
per token (``Engine.kv_bytes``), so a batch admitted under the budget stays under it to its end. The prompt
cache's memory tier gives way first (to disk, where there is a tier). A sequence that does not fit waits in the
queue while others run; one that could not fit even alone is refused with a 503.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from forgellm.core.engine.backend import Engine
from forgellm.core.engine.generation import GenerationJob
from forgellm.core.errors import ApiError, service_unavailable

# The bytes this model's running sequences and prompt cache may take (the budget less the weights and the other
# models' memory), or None without a budget.
Allowance = Callable[[], int | None]


def kv_length(job: GenerationJob) -> int:
    """The most positions a job's sequence can hold: its prompt and every token it may generate."""
    return len(job.prompt_tokens) + job.max_tokens


def reserved_bytes(engine: Engine, jobs: Iterable[GenerationJob]) -> int:
    """The most bytes the engine's batch can take running these jobs together."""
    lengths = [kv_length(job) for job in jobs]
    return engine.kv_bytes(len(lengths), max(lengths)) if lengths else 0


class KvAdmission:
    def __init__(self) -> None:
        self.allowance: Allowance = lambda: None

    def refusal(self, engine: Engine | None, job: GenerationJob) -> ApiError | None:
        """A 503 for a job whose KV cache could not fit even in an empty batch; None when it could."""
        allowance = self.allowance()
        if allowance is None or engine is None:
            return None
        need = reserved_bytes(engine, [job])
        if need <= allowance:
            return None
        return service_unavailable(
            f"This request's KV cache ({kv_length(job):,} tokens of prompt and max_tokens, {need:,} bytes) does not "
            f"fit the memory budget ({max(allowance, 0):,} bytes free for this model's sequences); ask for fewer "
            "max_tokens or send a shorter prompt",
            retry_after=5,
        )

    def room(self, engine: Engine, running: list[GenerationJob], job: GenerationJob) -> bool:
        """Whether job fits beside the running jobs, once the prompt cache has given way as far as needed."""
        allowance = self.allowance()
        if allowance is None:
            return True
        need = reserved_bytes(engine, [*running, job])
        held = engine.cache_stats().memory_bytes
        if need + held <= allowance:
            return True
        if need > allowance:
            return False
        engine.release_cache(need + held - allowance)
        return need + engine.cache_stats().memory_bytes <= allowance
