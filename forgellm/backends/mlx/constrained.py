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

# Keywords whose value is one schema, a list of schemas, or a map of names to schemas.
_ONE_SCHEMA = ("additionalProperties", "items", "contains", "not", "if", "then", "else", "propertyNames")
_SCHEMA_LISTS = ("prefixItems", "anyOf", "oneOf")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def strict_objects(schema: Any, *, in_all_of: bool = False) -> Any:
    """The schema with every object that names its properties closed to others, unless it says otherwise
    (``additionalProperties`` or ``unevaluatedProperties`` of its own).

    Plain JSON Schema lets an object hold any property it does not name, and a small model under such a
    grammar invents keys until max_tokens. OpenAI's strict mode requires closed objects, and xgrammar's
    strict mode (vLLM's and SGLang's default) closes them; so do we. An object that names no properties
    (JSON mode's {"type": "object"}) stays open, and so do allOf's branches, which name each other's."""
    if isinstance(schema, list):
        return [strict_objects(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    strict: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _ONE_SCHEMA or key in _SCHEMA_LISTS:
            strict[key] = strict_objects(value)
        elif key == "allOf" and isinstance(value, list):
            strict[key] = [strict_objects(item, in_all_of=True) for item in value]
        elif key in _SCHEMA_MAPS and isinstance(value, dict):
            strict[key] = {name: strict_objects(item) for name, item in value.items()}
        else:
            strict[key] = value
    named = isinstance(schema.get("properties"), dict)
    if named and not in_all_of and "additionalProperties" not in schema and "unevaluatedProperties" not in schema:
        strict["additionalProperties"] = False
    return strict


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
            schema = json.dumps(strict_objects(constraint.json_schema))
            grammar = LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
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
