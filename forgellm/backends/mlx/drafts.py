"""Where a sequence's draft tokens come from when no draft model is given: the text it has already seen.

Both sources cost no model call. ``PromptLookup`` proposes what followed the latest earlier occurrence of the
sequence's last few tokens (prompt-lookup decoding); it wins where the output quotes its context (an edited
file, a quoted passage, JSON filled from a document). ``PredictedOutput`` proposes from the text the client
predicted the answer to be (OpenAI's Predicted Outputs), following it as long as the output does.
"""

from __future__ import annotations

import bisect
from typing import Protocol

from forgellm import PREDICTION_SOURCE

PROMPT_LOOKUP = "prompt_lookup"

# The n-gram lengths looked up, longest first: a longer match says more about what follows.
LONGEST_NGRAM = 4
SHORTEST_NGRAM = 2


class DraftSource(Protocol):
    """Proposes tokens to follow one sequence; named by ``source`` in the metrics."""

    source: str

    def propose(self, tokens: list[int], limit: int) -> list[int]:
        """Up to limit tokens to follow tokens (the sequence so far, which only ever grows at its end)."""
        ...


class NgramIndex:
    """Where each n-gram of a growing token sequence last ended, for n from SHORTEST_NGRAM to LONGEST_NGRAM.

    Only n-grams followed by at least one token are indexed, so a lookup of the sequence's own last n tokens
    finds an earlier occurrence, whose continuation is the proposal."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self._last_end: dict[tuple[int, ...], int] = {}

    def extend(self, tokens: list[int]) -> None:
        for token in tokens:
            end = len(self.tokens)  # the n-grams ending here now have a continuation: token
            for n in range(SHORTEST_NGRAM, LONGEST_NGRAM + 1):
                if end >= n:
                    self._last_end[tuple(self.tokens[end - n : end])] = end
            self.tokens.append(token)

    def continuation(self, limit: int) -> list[int]:
        """What followed the latest earlier occurrence of the longest suffix that occurred before."""
        size = len(self.tokens)
        for n in range(LONGEST_NGRAM, SHORTEST_NGRAM - 1, -1):
            end = self._last_end.get(tuple(self.tokens[size - n :])) if size >= n else None
            if end is not None:
                return self.tokens[end : end + limit]
        return []


class PromptLookup:
    """Drafts for one sequence from its own prompt and output."""

    source = PROMPT_LOOKUP

    def __init__(self) -> None:
        self._index = NgramIndex()

    def propose(self, tokens: list[int], limit: int) -> list[int]:
        self._index.extend(tokens[len(self._index.tokens) :])
        return self._index.continuation(limit)


class PredictedOutput:
    """Drafts for one sequence from the output its client predicted.

    The prediction is followed from where the output last matched it: while the output keeps to the
    prediction, the next tokens of the prediction are proposed; where it departs (an edit), the output's last
    tokens are looked up in the prediction again, nearest after that point first, and it is followed from
    there."""

    source = PREDICTION_SOURCE  # the source OpenAI's usage fields count

    def __init__(self, prediction: list[int], output_start: int) -> None:
        self._prediction = prediction
        self._output_start = output_start  # where the output begins in the sequence (the prompt's length)
        self._ends: dict[tuple[int, ...], list[int]] = {}
        for n in range(1, LONGEST_NGRAM + 1):
            for end in range(n, len(prediction) + 1):
                self._ends.setdefault(tuple(prediction[end - n : end]), []).append(end)
        self._cursor = 0  # where in the prediction the output is expected to go on

    def propose(self, tokens: list[int], limit: int) -> list[int]:
        for n in range(min(LONGEST_NGRAM, len(tokens) - self._output_start), 0, -1):
            ends = self._ends.get(tuple(tokens[-n:]))
            if ends:
                at = bisect.bisect_left(ends, self._cursor)
                end = ends[at] if at < len(ends) else ends[-1]
                self._cursor = end
                return self._prediction[end : end + limit]
        return []
