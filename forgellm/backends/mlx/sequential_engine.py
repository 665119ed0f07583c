"""One sequence at a time through mlx-lm's generate_step, for models whose KV cache cannot be batched."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import generate_step
from mlx_lm.tokenizer_utils import TokenizerWrapper

from forgellm import Engine, GenerationJob, TokenOutput
from forgellm.backends.mlx.batch_engine import checked_prompt
from forgellm.backends.mlx.decoding import Decoding
from forgellm.backends.mlx.detokenize import Detokenizers


class MlxSequentialEngine(Engine):
    """One sequence at a time through mlx-lm's generate_step, for models whose cache cannot be batched."""

    def __init__(self, model: nn.Module, tokenizer: TokenizerWrapper, decoding: Decoding, vocab_size: int) -> None:
        self._vocab_size = vocab_size
        self._model = model
        self._decoding = decoding
        self._eos = set(tokenizer.eos_token_ids)
        self._detokenizers = Detokenizers(tokenizer, decoding)
        self._waiting: deque[tuple[int, GenerationJob]] = deque()
        # (seq_id, job, mlx-lm's generate_step generator, tokens so far)
        self._current: tuple[int, GenerationJob, Iterator[Any], int] | None = None

    def add(self, seq_id: int, job: GenerationJob) -> int:
        checked_prompt(job.prompt_tokens, self._vocab_size)
        self._waiting.append((seq_id, job))
        return 0

    def step(self) -> list[TokenOutput]:
        if self._current is None:
            if not self._waiting:
                return []
            seq_id, job = self._waiting.popleft()
            tokens: Iterator[Any] = generate_step(
                mx.array(job.prompt_tokens),
                self._model,
                max_tokens=job.max_tokens,
                sampler=self._decoding.sampler(job),
                logits_processors=self._decoding.processors(job),
            )
            self._detokenizers.start(seq_id)
            self._current = (seq_id, job, tokens, 0)
        seq_id, job, tokens, count = self._current
        sampled, logprobs = next(tokens)
        token = int(sampled)
        count += 1
        finish_reason = "stop" if token in self._eos else ("length" if count >= job.max_tokens else None)
        text = self._detokenizers.text(seq_id, token, finish_reason)
        self._current = None if finish_reason else (seq_id, job, tokens, count)
        return [
            TokenOutput(
                seq_id, text, finish_reason, logprob=self._decoding.logprob(job, token, logprobs, finish_reason)
            )
        ]

    def remove(self, seq_ids: Iterable[int]) -> None:
        gone = set(seq_ids)
        self._waiting = deque(item for item in self._waiting if item[0] not in gone)
        if self._current is not None and self._current[0] in gone:
            self._current = None
        for seq_id in gone:
            self._detokenizers.drop(seq_id)

    def __len__(self) -> int:
        return len(self._waiting) + (self._current is not None)

    def close(self) -> None:
        self._current = None
