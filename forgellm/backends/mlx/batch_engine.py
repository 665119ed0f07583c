"""Continuous batching on mlx-lm's BatchGenerator, reusing the KV caches of finished sequences.

The batch engine keeps the KV caches of recently finished sequences (mlx-lm's ``LRUPromptCache``, as
mlx_lm.server does), so a prompt that shares a prefix with one of them (a system prompt, the earlier
turns of a conversation) skips that prefix's prefill.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import BatchKVCache
from mlx_lm.sample_utils import greedy_sampler
from mlx_lm.tokenizer_utils import TokenizerWrapper

from forgellm import CacheStats, Engine, GenerationJob, TokenOutput
from forgellm.backends.mlx.decoding import Decoding
from forgellm.backends.mlx.detokenize import Detokenizers
from forgellm.backends.mlx.draft_model import DraftModel
from forgellm.backends.mlx.draft_policy import SpeculationSettings
from forgellm.backends.mlx.drafts import DraftSource, PredictedOutput, PromptLookup
from forgellm.backends.mlx.kv_rollback import rolls_back_per_row
from forgellm.backends.mlx.options import (
    DEFAULT_PREFILL_BATCH_SIZE,
    DEFAULT_PREFILL_CHUNK_SIZE,
    DEFAULT_PROMPT_CACHE_DISK_BYTES,
    DEFAULT_PROMPT_CACHE_SIZE,
)
from forgellm.backends.mlx.prompt_cache import PromptCache
from forgellm.backends.mlx.quantized_kv import KvQuantization, LayerQuantization, QuantizableKVCache
from forgellm.backends.mlx.sampling import LogitsProcessor, Sampler
from forgellm.backends.mlx.speculative_batch import DraftRow, SpeculativeBatch

logger = logging.getLogger("forgellm.mlx")


@dataclass(frozen=True)
class EngineTuning:
    """How the batch engine trades memory and latency against throughput (--prompt-cache-size,
    --prompt-cache-bytes, --prefill-batch-size, --prefill-chunk-size)."""

    prompt_cache_size: int = DEFAULT_PROMPT_CACHE_SIZE
    prompt_cache_bytes: int = 0  # 0: bounded by entries only
    prompt_cache_dir: str | None = None  # the disk tier's folder (None: no disk tier)
    prompt_cache_disk_bytes: int = DEFAULT_PROMPT_CACHE_DISK_BYTES
    prefill_batch_size: int = DEFAULT_PREFILL_BATCH_SIZE
    prefill_chunk_size: int = DEFAULT_PREFILL_CHUNK_SIZE
    speculation: SpeculationSettings = SpeculationSettings()
    kv_quantization: KvQuantization | None = None  # None: the model's dtype

    def prefill_batch(self, max_batch_size: int) -> int:
        return min(self.prefill_batch_size, max_batch_size)


class RowFaults:
    """Failures of one row's own processing (its logits processors, its sampler), kept to that row.

    mlx-lm calls each row's processors and sampler inside the batch's step, so an exception in one would fail
    the step and every sequence in it. Wrapped here, a failure marks its row failed and hands back the logits
    unchanged (or a greedy token), so the step completes for the others; the engine then ends the failed row
    with its error."""

    def __init__(self) -> None:
        self.failed: dict[int, str] = {}

    def _fail(self, seq_id: int, exc: Exception) -> None:
        logger.exception("sequence %d failed in its own processing; the batch goes on", seq_id, exc_info=exc)
        self.failed.setdefault(seq_id, str(exc) or type(exc).__name__)

    def processors(self, seq_id: int, processors: list[LogitsProcessor]) -> list[LogitsProcessor]:
        def guarded(processor: LogitsProcessor) -> LogitsProcessor:
            def process(tokens: mx.array, logits: mx.array) -> mx.array:
                if seq_id in self.failed:
                    return logits
                try:
                    return processor(tokens, logits)
                except Exception as exc:
                    self._fail(seq_id, exc)
                    return logits

            return process

        return [guarded(processor) for processor in processors]

    def sampler(self, seq_id: int, sampler: Sampler) -> Sampler:
        if sampler is greedy_sampler:
            return sampler  # shared by the greedy rows so they sample in one call; it cannot fail for one row

        def sample(logprobs: mx.array) -> mx.array:
            try:
                return sampler(logprobs)
            except Exception as exc:
                self._fail(seq_id, exc)
                return mx.argmax(logprobs, axis=-1)

        return sample

    def take(self) -> dict[int, str]:
        failed, self.failed = self.failed, {}
        return failed


def checked_prompt(prompt: list[int], vocab_size: int) -> list[int]:
    """The prompt, if it is token ids the model has; else ValueError (an engine would fail the whole prefill
    pass it joined, not this prompt alone)."""
    if not prompt:
        raise ValueError("the prompt has no tokens")
    for token in prompt:
        if type(token) is not int or not 0 <= token < vocab_size:
            raise ValueError(f"the prompt holds {token!r}, which is not a token id of this model")
    return prompt


class MlxBatchEngine(Engine):
    """Continuous batching on mlx-lm's BatchGenerator, reusing the KV caches of finished sequences."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: TokenizerWrapper,
        decoding: Decoding,
        max_batch_size: int,
        vocab_size: int,
        tuning: EngineTuning = EngineTuning(),
        draft: nn.Module | None = None,
        prompt_cache: PromptCache | None = None,
        kv_bytes_per_token: int = 0,
        kv_layers: list[LayerQuantization] | None = None,
    ) -> None:
        self._decoding = decoding
        self._generator = BatchGenerator(
            model,
            stop_tokens=[[t] for t in tokenizer.eos_token_ids],
            completion_batch_size=max_batch_size,
            prefill_batch_size=tuning.prefill_batch(max_batch_size),
            prefill_step_size=tuning.prefill_chunk_size,
        )
        self._speculation = tuning.speculation
        # A model whose cache cannot hand back positions per row decodes one token a step, whatever is asked.
        self._speculating = tuning.speculation.enabled and rolls_back_per_row(model)
        self._draft_rows: dict[int, DraftRow] = {}
        self._has_draft_model = draft is not None and self._speculating
        if self._speculating:
            self._generator._generation_batch = SpeculativeBatch(
                model,
                self._generator.sampler,
                tuning.speculation,
                self._draft_rows.get,
                DraftModel(draft) if draft is not None else None,
            )
        self._prompt_cache = prompt_cache
        self._kv_bytes_per_token = kv_bytes_per_token
        self._detokenizers = Detokenizers(tokenizer, decoding)
        self._seq_of_uid: dict[int, int] = {}
        self._uid_of_seq: dict[int, int] = {}
        self._jobs: dict[int, GenerationJob] = {}
        self._faults = RowFaults()
        self._vocab_size = vocab_size
        self._kv_layers = kv_layers  # each layer's quantization; None: the model's dtype

    def _fresh_cache(self) -> list[Any] | None:
        """A new sequence's cache: None lets mlx-lm make its own, at the model's dtype."""
        if self._kv_layers is None:
            return None
        return [QuantizableKVCache(layer) for layer in self._kv_layers]

    def add(self, seq_id: int, job: GenerationJob) -> int:
        checked_prompt(job.prompt_tokens, self._vocab_size)
        cache, rest = self._prompt_cache.nearest(job.prompt_tokens) if self._prompt_cache else (None, job.prompt_tokens)
        cached = len(job.prompt_tokens) - len(rest)
        (uid,) = self._generator.insert(
            [rest],
            max_tokens=[job.max_tokens],
            caches=[cache if cache is not None else self._fresh_cache()],  # type: ignore[list-item]
            all_tokens=[job.prompt_tokens[:cached]],
            samplers=[self._faults.sampler(seq_id, self._decoding.sampler(job))],
            logits_processors=[self._faults.processors(seq_id, self._decoding.processors(job))],
        )
        self._seq_of_uid[uid] = seq_id
        self._uid_of_seq[seq_id] = uid
        sources = self._draft_sources(job)
        if sources or self._has_draft_model:
            random_per_position = job.sampling.xtc_probability > 0
            self._draft_rows[uid] = DraftRow(sources, random_per_position, draft_model=self._has_draft_model)
        self._jobs[seq_id] = job
        self._detokenizers.start(seq_id)
        return cached

    def _draft_sources(self, job: GenerationJob) -> list[DraftSource]:
        sources: list[DraftSource] = []
        if not self._speculating:
            return sources
        if job.prediction:
            sources.append(PredictedOutput(job.prediction, len(job.prompt_tokens)))
        if self._speculation.prompt_lookup:
            sources.append(PromptLookup())
        return sources

    def step(self) -> list[TokenOutput]:
        _, responses = self._generator.next()
        failed = self._faults.take()
        outputs = [TokenOutput(seq_id, "", error=error) for seq_id, error in failed.items() if seq_id in self._jobs]
        self.remove(failed)
        for response in responses:
            seq_id = self._seq_of_uid.get(response.uid)
            if seq_id is None:
                continue  # failed in this step
            row = self._draft_rows.get(response.uid)
            drafts = row.take_drafts() if row is not None else ()
            text = self._detokenizers.text(seq_id, response.token, response.finish_reason)
            logprob = self._decoding.logprob(
                self._jobs[seq_id], response.token, response.logprobs, response.finish_reason
            )
            if response.finish_reason is not None:
                self._forget(seq_id)
                if self._prompt_cache is not None:
                    # mlx-lm extracts a finished sequence's cache anyway: keep it for later prompts.
                    self._prompt_cache.insert(list(response.all_tokens), response.prompt_cache)
            outputs.append(TokenOutput(seq_id, text, response.finish_reason, logprob=logprob, drafts=drafts))
        return outputs

    def _batch_kv_bytes(self) -> int:
        held = 0
        for batch in (
            getattr(self._generator, "_generation_batch", None),
            getattr(self._generator, "_prompt_batch", None),
        ):
            for layer in getattr(batch, "prompt_cache", None) or ():
                try:
                    held += int(layer.nbytes)
                except (AttributeError, NotImplementedError, TypeError):
                    pass  # an empty layer has no arrays yet
        return held

    def cache_stats(self) -> CacheStats:
        if self._prompt_cache is None:
            return CacheStats(self._kv_bytes_per_token, self._batch_kv_bytes())
        return self._prompt_cache.stats(self._kv_bytes_per_token, self._batch_kv_bytes())

    def kv_bytes(self, rows: int, longest: int) -> int:
        # The batch holds every row as long as its longest (shorter ones are left-padded), in buffers grown
        # 256 positions at a time, with room for a step's draft tokens.
        positions = longest + (self._speculation.max_draft_tokens + 1 if self._speculating else 0)
        allocated = -(-positions // BatchKVCache.step) * BatchKVCache.step
        return self._kv_bytes_per_token * rows * allocated

    def release_cache(self, nbytes: int) -> None:
        if self._prompt_cache is not None:
            self._prompt_cache.release(nbytes)

    def keep_newest_cached(self, entries: int) -> None:
        """Keep only the newest entries of the prompt cache (a follower rank matching rank 0's)."""
        if self._prompt_cache is not None:
            self._prompt_cache.keep_newest(entries)

    def remove(self, seq_ids: Iterable[int]) -> None:
        uids = [self._uid_of_seq[s] for s in seq_ids if s in self._uid_of_seq]
        if uids:
            self._generator.remove(uids)
        for seq_id in seq_ids:
            self._forget(seq_id)

    def _forget(self, seq_id: int) -> None:
        uid = self._uid_of_seq.pop(seq_id, None)
        if uid is not None:
            self._seq_of_uid.pop(uid, None)
            self._draft_rows.pop(uid, None)
        self._jobs.pop(seq_id, None)
        self._detokenizers.drop(seq_id)

    def __len__(self) -> int:
        return len(self._uid_of_seq)

    def close(self) -> None:
        self._generator.close()
        if self._prompt_cache is not None:
            self._prompt_cache.close()
