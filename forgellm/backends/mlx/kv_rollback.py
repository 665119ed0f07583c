"""Handing back positions per row of a batched KV cache, for speculative decoding's rejected drafts."""

from __future__ import annotations

from typing import Any

import mlx.nn as nn
from mlx_lm.models.cache import KVCache, make_prompt_cache


def rolls_back_per_row(model: nn.Module) -> bool:
    """Whether the model's batched cache can hand back positions per row: plain attention at every layer (mlx-lm
    batches those as BatchKVCache), not a sliding window's rotating cache, nor a recurrent layer's state."""
    return all(type(layer) is KVCache for layer in make_prompt_cache(model))


def roll_back(prompt_cache: list[Any], surplus: list[int]) -> None:
    """Drop each row's last surplus[i] positions. What every row drops is trimmed; the rest is rolled out of
    each row (right, by that many), which grows its left padding by as many, so the attention mask hides the
    rolled-in positions (``BatchKVCache.prepare(right_padding=...)`` and ``finalize()``)."""
    common = min(surplus)
    extra = [count - common for count in surplus]
    for layer in prompt_cache:
        if common:
            layer.trim(common)
        if any(extra):
            layer.prepare(right_padding=extra)
            layer.finalize()
