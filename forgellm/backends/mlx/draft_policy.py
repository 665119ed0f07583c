"""When to speculate, and how far: each sequence's recent acceptance against what a drafted position costs.

A decoding step's time grows with the positions it computes. Measured on SmolLM2-135M on 2 CPU cores with
OpenBLAS (benchmarks/README.md, "Speculative decoding"), a step of B sequences and L positions each takes
about c0 + c1·B·L, with c1/c0 about 0.06: a step with one sequence costs 64 ms for one position and 118 ms
for 16. The batch's positions are padded to its longest draft, so every row pays for the widest one; a draft
position of a row whose tokens are accepted with probability α adds α^j expected tokens at its j-th place.
The step's draft width is the one that gives the most expected tokens per unit of cost, so a lone sequence
copying its prompt drafts long, a large batch of ordinary chat drafts nothing, and a row whose drafts keep
failing stops counting towards any width.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# mlx_lm.server's --num-draft-tokens names the same bound; 3 suits its draft models. A prompt-lookup draft of
# a quoted file is often right for dozens of tokens, and a longer width is only chosen where it pays.
DEFAULT_NUM_DRAFT_TOKENS = 16
# c1/c0 above, measured on the CPU; on a GPU extra positions cost far less (--draft-position-cost).
DEFAULT_POSITION_COST = 0.06
# A speculating step cannot overlap its Python work with the model's (it must see the sampled tokens before
# it can verify them): an allowance of 3% of a one-sequence step for that, not measured on its own.
SPECULATIVE_STEP_OVERHEAD = 0.03


@dataclass(frozen=True)
class SpeculationSettings:
    """How the batch engine speculates (--speculation, --num-draft-tokens, --draft-position-cost)."""

    enabled: bool = True  # off: one token per step, whatever the request
    prompt_lookup: bool = True  # draft every sequence from its own prompt and output
    max_draft_tokens: int = DEFAULT_NUM_DRAFT_TOKENS
    position_cost: float = DEFAULT_POSITION_COST


class Acceptance:
    """One sequence's per-token acceptance rate for one draft source, estimated from its recent drafts.

    A draft of k tokens of which a were accepted is a successes, then a failure if a < k. The estimate decays
    old steps away, so it follows a sequence that stops (or starts) quoting; a source that goes unused drifts
    back to the prior, so a sequence whose drafts once failed is tried again later."""

    PRIOR_RATE = 0.5
    PRIOR_WEIGHT = 2.0
    DECAY = 0.85
    IDLE_DECAY = 0.97

    def __init__(self) -> None:
        self._accepted = 0.0
        self._rejected = 0.0

    @property
    def rate(self) -> float:
        prior_accepted = self.PRIOR_RATE * self.PRIOR_WEIGHT
        return (self._accepted + prior_accepted) / (self._accepted + self._rejected + self.PRIOR_WEIGHT)

    def record(self, drafted: int, accepted: int) -> None:
        self._accepted = self._accepted * self.DECAY + accepted
        self._rejected = self._rejected * self.DECAY + (1 if accepted < drafted else 0)

    def idle(self) -> None:
        self._accepted *= self.IDLE_DECAY
        self._rejected *= self.IDLE_DECAY


def expected_tokens(rate: float, drafted: int) -> float:
    """Tokens a step yields for a row with drafted tokens, each accepted with the rate: 1 + rate + rate² + …"""
    return 1.0 + sum(rate**j for j in range(1, drafted + 1))


def draft_width(rows: Sequence[tuple[float, int]], settings: SpeculationSettings) -> int:
    """The number of draft positions this step computes for every row (0: an ordinary step).

    rows: each row's acceptance rate and the number of draft tokens it has (0 for none)."""
    size = len(rows)
    widest = min(settings.max_draft_tokens, max((length for _, length in rows), default=0))
    best_width, best_value = 0, size / (1.0 + settings.position_cost * size)
    for width in range(1, widest + 1):
        tokens = sum(expected_tokens(rate, min(length, width)) for rate, length in rows)
        cost = 1.0 + settings.position_cost * size * (width + 1) + SPECULATIVE_STEP_OVERHEAD
        if tokens / cost > best_value:
            best_width, best_value = width, tokens / cost
    return best_width
