"""Handing back positions per row of a batched KV cache, for speculative decoding's rejected drafts."""

from __future__ import annotations

from typing import Any

from mlx_lm.models.cache import BatchKVCache


def can_roll_back(prompt_cache: list[Any]) -> bool:
    """Whether every cache layer can hand back positions per row (plain attention caches; not a sliding
    window's rotating cache, nor a recurrent layer's state)."""
    return bool(prompt_cache) and all(isinstance(layer, BatchKVCache) for layer in prompt_cache)


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
