"""Samplers and penalties for one sequence: what a request's sampling fields become on MLX arrays.

Values go in as arrays wherever mlx-lm compiles: a Python float would make every distinct value a new
compilation (about 0.6 s each, stalling the whole batch).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import mlx.core as mx
from mlx_lm.sample_utils import apply_top_k, apply_top_p, greedy_sampler

from forgellm import SamplingParams

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


def _top_k_filter(top_k: int) -> Sampler:
    """mlx-lm's top-k, except that a k covering the whole vocabulary keeps every token instead of failing."""

    def keep(logprobs: mx.array) -> mx.array:
        # mlx-lm's compiled top-k would raise mid-trace, leaving MLX's random state unusable.
        return logprobs if top_k >= logprobs.shape[-1] else apply_top_k(logprobs, top_k)

    return keep


def _min_p_filter(min_p: float) -> Sampler:
    """Keep tokens at least min_p times as likely as the best one.

    Written here rather than mlx-lm's apply_min_p, which checks its bound in Python and so
    cannot take min_p as an array: each distinct value would be a new compilation.
    """
    log_min_p = mx.array(math.log(min_p))

    def keep(logprobs: mx.array) -> mx.array:
        threshold = logprobs.max(axis=-1, keepdims=True) + log_min_p
        return mx.where(logprobs >= threshold, logprobs, -mx.inf)

    return keep


def _xtc_cut(logprobs: mx.array, threshold: mx.array, keep: mx.array) -> mx.array:
    """XTC's cut: every token likelier than the threshold but the least likely of them is dropped (tokens in
    keep, the end and newline tokens, never are)."""
    probs = mx.exp(logprobs)
    least_above = mx.where(probs > threshold, probs, mx.inf).min(axis=-1, keepdims=True)
    return mx.where((probs > least_above) & ~keep, -mx.inf, logprobs)


def make_random_sampler(params: SamplingParams, xtc_kept: list[int] | None = None) -> Sampler:
    """Filters, then a draw at the request's temperature; a seeded request draws from its own PRNG key,
    so it is reproducible even inside a shared batch.

    XTC is written here rather than taken from mlx-lm (apply_xtc), whose draw comes from MLX's global random
    state: a seeded request would no longer be reproducible in a shared batch."""
    key = mx.random.key(params.seed) if params.seed is not None else None
    filters = []
    # Values go in as arrays: mlx-lm compiles its filters, and a Python float would make every
    # distinct value a new compilation (about 0.6 s each, stalling the whole batch).
    if 0 < params.top_p < 1.0:
        top_p = mx.array(params.top_p)
        filters.append(lambda lp: apply_top_p(lp, top_p))  # type: ignore[arg-type]  # an array, as said above
    if params.min_p > 0:
        filters.append(_min_p_filter(params.min_p))
    if params.top_k > 0:
        filters.append(_top_k_filter(params.top_k))
    xtc = params.xtc_probability > 0
    xtc_threshold, xtc_probability = mx.array(params.xtc_threshold), mx.array(params.xtc_probability)
    xtc_keep: mx.array | None = None

    def draw_key() -> mx.array | None:
        nonlocal key
        if key is None:
            return None
        key, subkey = mx.random.split(key)
        return subkey

    def sample(logprobs: mx.array) -> mx.array:
        nonlocal xtc_keep
        for keep in filters:
            logprobs = keep(logprobs)
        if xtc:
            if xtc_keep is None:
                xtc_keep = mx.zeros((logprobs.shape[-1],), dtype=mx.bool_)
                if xtc_kept:
                    xtc_keep[mx.array(xtc_kept)] = True
            cut = mx.random.uniform(key=draw_key()) < xtc_probability
            logprobs = mx.where(cut, _xtc_cut(logprobs, xtc_threshold, xtc_keep), logprobs)
        scaled = logprobs * (1.0 / params.temperature)
        return mx.random.categorical(scaled, key=draw_key())

    return sample


def sampler_for(params: SamplingParams, xtc_kept: list[int] | None = None) -> Sampler:
    if params.temperature == 0:
        # Greedy requests all share mlx-lm's one greedy sampler, so a batch of them samples in one call.
        return greedy_sampler
    return make_random_sampler(params, xtc_kept)


def penalty_processor(params: SamplingParams, prompt_length: int) -> LogitsProcessor:
    """The presence and frequency penalties: OpenAI's, over the tokens generated so far (not the prompt's); or,
    given a context size, mlx_lm.server's, over the last that many tokens of prompt and output alike.

    Written here rather than taken from mlx-lm, whose penalties always look at a window; the penalties are
    plain array arithmetic, so no value costs a compilation."""

    def counts(tokens: mx.array, window: int | None, size: int, dtype: mx.Dtype) -> mx.array | None:
        seen = tokens[-window:] if window else tokens[prompt_length:]
        if seen.size == 0:
            return None
        return mx.zeros((size,), dtype=dtype).at[seen].add(1)

    def penalize(tokens: mx.array, logits: mx.array) -> mx.array:
        size, dtype = logits.shape[-1], logits.dtype
        presence_window, frequency_window = params.presence_context_size, params.frequency_context_size
        present = counts(tokens, presence_window, size, dtype) if params.presence_penalty else None
        if present is not None:
            logits = logits - params.presence_penalty * (present > 0)
        if params.frequency_penalty:
            # Over the same tokens as the presence penalty (OpenAI's, or one window), the count is the same.
            same = params.presence_penalty and frequency_window == presence_window
            frequent = present if same else counts(tokens, frequency_window, size, dtype)
            if frequent is not None:
                logits = logits - params.frequency_penalty * frequent
        return logits

    return penalize
