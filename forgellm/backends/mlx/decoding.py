"""How one model's sequences are decoded: each job's sampler and logits processors, and its logprobs."""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.sample_utils import make_logits_processors
from mlx_lm.tokenizer_utils import TokenizerWrapper
from transformers.convert_slow_tokenizer import bytes_to_unicode

from forgellm import GenerationJob, TokenLogprob
from forgellm.backends.mlx.constrained import ConstraintCompiler
from forgellm.backends.mlx.sampling import LogitsProcessor, Sampler, penalty_processor, sampler_for


class Decoding:
    """How one model's sequences are decoded beyond mlx-lm's defaults: each job's sampler and logits processors
    (repetition penalty, presence and frequency penalties, logit bias, a grammar), and the logprobs it reports."""

    def __init__(self, tokenizer: TokenizerWrapper, vocab_size: int) -> None:
        self._tokenizer = tokenizer
        self.constraints = ConstraintCompiler(tokenizer._tokenizer, vocab_size, tokenizer.eos_token_ids)
        # XTC never drops these (as mlx_lm.server): ending, and a new line.
        self._xtc_kept = [*tokenizer.encode("\n", add_special_tokens=False), *tokenizer.eos_token_ids]
        self._token_texts: dict[int, tuple[str, bytes]] = {}
        self._byte_values = {char: byte for byte, char in bytes_to_unicode().items()}

    def sampler(self, job: GenerationJob) -> Sampler:
        return sampler_for(job.sampling, self._xtc_kept)

    def processors(self, job: GenerationJob) -> list[LogitsProcessor]:
        params = job.sampling
        processors = make_logits_processors(
            logit_bias=dict(params.logit_bias) or None,
            repetition_penalty=params.repetition_penalty,
            repetition_context_size=params.repetition_context_size,
        )
        if params.presence_penalty or params.frequency_penalty:
            processors.append(penalty_processor(params, len(job.prompt_tokens)))
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
