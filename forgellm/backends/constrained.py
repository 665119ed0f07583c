"""Constrained decoding for the MLX engine: llguidance matchers applied as mlx-lm logits processors.

A constrained sequence gets its own matcher, compiled from the job's Constraint (a JSON schema),
and a logits processor that, at each of the sequence's decoding steps, feeds the matcher the token
just sampled and masks every token the grammar does not allow next. mlx-lm's batch generator runs a
sequence's processors on that sequence's row of the batch's logits, so constrained and free
sequences share one forward pass per step; only the mask (about 0.3 ms for a 49,152-token vocabulary
on the CPU) is per sequence. When the value is complete, only the model's end tokens are allowed.

llguidance ships a Metal kernel for MLX; the mask here is applied with plain MLX operations
(``mx.where`` over llguidance's byte mask), so it runs on every device MLX does.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from typing import Any

import mlx.core as mx
import numpy as np
from llguidance import LLMatcher, LLTokenizer
from llguidance.hf import from_tokenizer

from forgellm import Constraint

# Compact JSON, as OpenAI's structured outputs produce: no whitespace for the model to wander in.
JSON_OPTIONS: Any = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}

LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


class ConstraintCompiler:
    """One model's grammars: its tokenizer as llguidance sees it (built on first use, about half a second)."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int, eos_token_ids: Iterable[int]) -> None:
        self._hf_tokenizer = hf_tokenizer
        self._vocab_size = vocab_size
        self._eos = np.array(sorted(eos_token_ids), dtype=np.int64)
        self._tokenizer: LLTokenizer | None = None
        self._lock = threading.Lock()

    def _llg_tokenizer(self) -> LLTokenizer:
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = from_tokenizer(self._hf_tokenizer, n_vocab=self._vocab_size)
            return self._tokenizer

    def grammar(self, constraint: Constraint) -> str:
        """The llguidance grammar for a constraint; ValueError says why a schema cannot be compiled."""
        try:
            grammar = LLMatcher.grammar_from_json_schema(json.dumps(constraint.json_schema), defaults=JSON_OPTIONS)
        except ValueError as exc:
            raise ValueError(f"the JSON schema cannot be used: {exc}") from None
        problem = LLMatcher.validate_grammar(grammar, self._llg_tokenizer())
        if problem:
            raise ValueError(f"the JSON schema cannot be used: {problem}")
        start = LLMatcher(self._llg_tokenizer(), grammar)
        start.compute_logit_bias()  # a grammar that no value satisfies fails its first mask
        if start.is_error():
            # It compiles but no value can start (a $ref that only refers to itself, say): the model could only
            # end at once, with an empty answer.
            raise ValueError("the JSON schema cannot be used: no JSON value satisfies it (a $ref cycle?)")
        return grammar

    def processor(self, constraint: Constraint) -> LogitsProcessor:
        """A fresh logits processor enforcing the constraint on one sequence."""
        return _MaskingProcessor(LLMatcher(self._llg_tokenizer(), self.grammar(constraint)), self._eos)


class _MaskingProcessor:
    """mlx-lm calls it once per decoding step of its sequence, with the tokens so far and the next logits."""

    def __init__(self, matcher: LLMatcher, eos: np.ndarray) -> None:
        self._matcher = matcher
        self._eos = eos
        self._started = False  # the first call comes before any token of this generation was sampled

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if self._started:
            self._matcher.consume_token(int(tokens[-1].item()))  # type: ignore[arg-type]  # a token id
        self._started = True
        allowed = np.zeros(logits.shape[-1], dtype=bool)
        if self._matcher.is_stopped() or self._matcher.is_error():
            allowed[self._eos] = True  # the value is complete (or cannot go on): only the end remains
        else:
            bias = np.frombuffer(self._matcher.compute_logit_bias(), dtype=np.uint8)
            allowed[: bias.size] = bias[: allowed.size] > 0
        return mx.where(mx.array(allowed), logits, -mx.inf)
