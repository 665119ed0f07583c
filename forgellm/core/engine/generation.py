"""What a generation is, as the scheduler and backends see it: a job in, text deltas out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float | None = None
    repetition_context_size: int = 20  # the last tokens (prompt and output) the repetition penalty looks at
    presence_penalty: float = 0.0  # subtracted once from the logit of every token already generated
    frequency_penalty: float = 0.0  # subtracted from a token's logit as often as it was generated
    # mlx_lm.server's windows: set, a penalty looks at the last this many tokens (prompt and output) instead.
    presence_context_size: int | None = None
    frequency_context_size: int | None = None
    # XTC ("exclude top choices"): with this probability per token, every token likelier than the threshold is
    # dropped but the least likely of them (mlx-lm's meaning).
    xtc_probability: float = 0.0
    xtc_threshold: float = 0.1
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit); -100 bans it
    seed: int | None = None


# The sampling fields a model may give defaults for (the operator's per-model defaults, its
# generation_config.json), used when a request leaves them out.
LAYERED_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


@dataclass(frozen=True)
class Constraint:
    """What a generation's text must be, enforced token by token (constrained decoding).

    ``json_schema``: a JSON value valid against the schema (a JSON object of any shape when the schema is
    ``{"type": "object"}`` with nothing else). The backend compiles it and refuses (ValueError) one it
    cannot; the generation ends when the value is complete."""

    json_schema: dict[str, Any]


@dataclass
class GenerationJob:
    """One request's generation: its prompt, and how to sample and stop.

    The before_generate hooks see it before the prompt is tokenized (prompt_tokens still empty), so that
    limits are checked before any work; a plugin may lower max_tokens (the ratelimit plugin does, to what a
    client's token budget has left). A job of max_tokens 0 only counts its prompt's tokens (Anthropic's
    count_tokens): it is admitted and accounted like the others, and generates nothing."""

    prompt_tokens: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    # What the route received, for plugins that inspect prompts (a prompt guard, say).
    prompt_text: str = ""
    constraint: Constraint | None = None
    # Per generated token, its log-probability and those of this many most likely alternatives (None: none).
    logprobs: int | None = None
    # Whose share of the batch it takes (the pipeline's client key): rows go to the clients holding fewest.
    client: str = ""
    # The output the client predicted (OpenAI's Predicted Outputs), as token ids: drafts for speculative
    # decoding, which never change what is generated, only how fast.
    prediction: list[int] | None = None
    # An embeddings request's inputs (a job of max_tokens 0): their tokens, counted as its prompt's, are its
    # whole cost, which token budgets charge instead of generated tokens.
    embeds: int = 0


# The draft source of a client's predicted output (GenerationJob.prediction), which OpenAI's usage reports on.
PREDICTION_SOURCE = "prediction"


@dataclass(frozen=True)
class DraftTokens:
    """Speculative decoding's work for one generation from one draft source: tokens drafted, and how many
    of them the model accepted (each accepted one saved a decoding step)."""

    source: str
    drafted: int
    accepted: int


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    drafts: tuple[DraftTokens, ...] = ()  # per draft source, when the backend speculated

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def drafted_tokens(self) -> int:
        return sum(count.drafted for count in self.drafts)

    @property
    def accepted_draft_tokens(self) -> int:
        return sum(count.accepted for count in self.drafts)

    @property
    def accepted_prediction_tokens(self) -> int:
        """Tokens of the client's predicted output that the output kept (OpenAI's usage field)."""
        return sum(count.accepted for count in self.drafts if count.source == PREDICTION_SOURCE)

    @property
    def rejected_prediction_tokens(self) -> int:
        """Tokens of the predicted output that were tried and not kept: computed, and counted as generated."""
        return sum(count.drafted - count.accepted for count in self.drafts if count.source == PREDICTION_SOURCE)


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token and how likely it was, with the most likely alternatives (for jobs that ask)."""

    token: str  # the token's text (a partial character shows as the replacement character)
    token_bytes: bytes  # the token's exact bytes
    logprob: float
    top: tuple[tuple[str, bytes, float], ...] = ()  # (text, bytes, logprob), most likely first


@dataclass(frozen=True)
class TokenOutput:
    """What one engine step produced for one sequence."""

    seq_id: int
    text: str
    finish_reason: str | None = None  # "stop", "length", or None while running
    error: str | None = None
    error_status: int = 500  # the HTTP status the error answers with (503: refused for now, retry)
    logprob: TokenLogprob | None = None  # when the job asked for logprobs
    stop_sequence: str | None = None  # the job's stop string that ended it (finish_reason "stop")
    drafts: tuple[DraftTokens, ...] = ()  # what speculative decoding drafted for it in this step


@dataclass(frozen=True)
class Delta:
    """What a streamed generation adds in one engine step: its text, and the logprobs of its tokens."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Completion:
    """A whole generation, as a non-streaming route returns it."""

    text: str
    finish_reason: str
    usage: Usage
    generation_time: float
    time_to_first_token: float
    # The job's stop string that ended it; None when the model's end token (or the length) did.
    stop_sequence: str | None = None

    @property
    def tokens_per_sec(self) -> float:
        return self.usage.completion_tokens / self.generation_time if self.generation_time > 0 else 0.0

    @property
    def cut_short(self) -> bool:
        """Whether a limit ended it (max_tokens, or --request-timeout) rather than the model or a stop string:
        every dialect says so, even of a tool call it was making."""
        return self.finish_reason in ("length", "timeout")
