"""A draft model for speculative decoding (--draft-model): a smaller model with the target's tokenizer, run over
the same rows as the target's batch, with its own batched KV cache rolled back per row like the target's.

Drafts are the draft model's greedy tokens, so they are deterministic and the batch's acceptance rule keeps
the target's output exact (speculative_batch says how). The draft cache follows its row's tokens lazily: a
row that joins is prefilled alone; at each drafting step every row first feeds what the draft model has not
seen of it (its pending token, and the last draft token when the whole draft was accepted), right-padded;
after verification each row keeps the positions of the tokens the target kept.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import BatchKVCache, make_prompt_cache

from forgellm.backends.mlx.kv_rollback import roll_back

DRAFT_MODEL = "draft_model"
PREFILL_CHUNK = 512  # tokens of a joining row's prompt the draft model prefills per pass


class DraftModel:
    """The draft model's view of the batch: one cache row per batch row, and how many tokens each has seen."""

    source = DRAFT_MODEL

    def __init__(self, model: nn.Module) -> None:
        self._model = model
        self._cache: list[Any] = []
        self._seen: list[int] = []

    def join(self, rows_tokens: list[list[int]]) -> None:
        """Rows joining the batch (at its end), each with the tokens its target cache holds."""
        for tokens in rows_tokens:
            single = make_prompt_cache(self._model)
            for start in range(0, len(tokens), PREFILL_CHUNK):
                self._model(mx.array([tokens[start : start + PREFILL_CHUNK]]), cache=single)
                mx.eval([layer.state for layer in single])
            merged = [BatchKVCache.merge([layer]) for layer in single]
            if self._cache:
                for layer, joining in zip(self._cache, merged, strict=True):
                    layer.extend(joining)
            else:
                self._cache = merged
            self._seen.append(len(tokens))

    def filter(self, keep: list[int]) -> None:
        if not keep:
            self._cache, self._seen = [], []
            return
        for layer in self._cache:
            layer.filter(keep)
        self._seen = [self._seen[i] for i in keep]

    def propose(self, rows_tokens: list[list[int]], pending: list[int], width: int) -> list[list[int]]:
        """width greedy draft tokens for every row, to follow its tokens and then its pending token."""
        unseen = [[*tokens[seen:], token] for tokens, seen, token in zip(rows_tokens, self._seen, pending, strict=True)]
        longest = max(len(feed) for feed in unseen)
        inputs = mx.array([feed + [0] * (longest - len(feed)) for feed in unseen])
        logits = self._model(inputs, cache=self._cache)
        last = mx.array([len(feed) - 1 for feed in unseen])
        drafted = [mx.argmax(logits[mx.arange(len(unseen)), last], axis=-1)]
        roll_back(self._cache, [longest - len(feed) for feed in unseen])
        self._seen = [seen + len(feed) for seen, feed in zip(self._seen, unseen, strict=True)]
        for _ in range(width - 1):
            logits = self._model(drafted[-1][:, None], cache=self._cache)
            drafted.append(mx.argmax(logits[:, -1], axis=-1))
        self._seen = [seen + width - 1 for seen in self._seen]
        rows: list[list[int]] = mx.stack(drafted, axis=1).tolist()  # type: ignore[assignment]
        return rows

    def kept(self, kept_counts: list[int], width: int) -> None:
        """After verification: row i kept kept_counts[i] tokens (its pending one and accepted drafts). The draft
        model saw the pending token and width - 1 drafts; what it saw beyond the kept tokens goes."""
        seen_beyond = [min(count, width) for count in kept_counts]
        roll_back(self._cache, [width - count for count in seen_beyond])
        self._seen = [seen - width + count for seen, count in zip(self._seen, seen_beyond, strict=True)]
