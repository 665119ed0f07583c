"""What every API dialect asks of the pipeline, in neutral terms: a ``GenerationRequest`` (a prompt or a
conversation, tools, sampling, limits) and the ``Caller`` who asks."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from forgellm.core.engine.generation import Constraint, SamplingParams
from forgellm.core.http.request_context import RequestRecord
from forgellm.core.identity import Identity

MAX_STOP_STRINGS = 16


@dataclass(frozen=True)
class ToolChoice:
    """Whether the model may call the request's tools: as it sees fit ("auto"), not at all ("none"), or it must
    ("required", or a call to the function ``name``): a forced call is generated under a grammar."""

    mode: Literal["auto", "none", "required"] = "auto"
    name: str | None = None
    parallel: bool = True  # a forced call may be several calls (required, no name)

    @property
    def forced(self) -> bool:
        return self.mode == "required" or self.name is not None


@dataclass(frozen=True)
class GenerationRequest:
    """What every dialect asks of the engine, in neutral terms: a raw prompt or a conversation, and limits."""

    prompt: str | list[int] | None = None  # raw text (or token ids), taken as it is
    messages: list[dict[str, Any]] | None = None  # a conversation, rendered with the model's chat template
    tools: list[dict[str, Any]] | None = None  # OpenAI-format function tools the conversation may call
    tool_choice: ToolChoice = field(default_factory=lambda: ToolChoice())
    template_options: dict[str, Any] | None = None  # passed to the chat template (enable_thinking, ...)
    max_tokens: int | None = None  # None: default_max_tokens
    # The dialect's default; None: until the model stops, bounded by --max-tokens-cap and the model's context.
    default_max_tokens: int | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    # The sampling fields the client set (client_sampling); the rest take the model's defaults where it has
    # some. None: every field is the request's own.
    sampling_given: frozenset[str] | None = None
    stop: tuple[str, ...] = ()
    model: str | None = None  # the model the client named; None: whichever serves
    constraint: Constraint | None = None  # what the output must be (constrained decoding)
    logprobs: int | None = None  # report each token's logprob and this many alternatives'
    prediction: str | None = None  # the output the client expects (mostly): drafts for speculative decoding

    @property
    def prompt_text(self) -> str:
        """The whole prompt as text, for plugins that inspect it: every message, system prompt and history too."""
        if self.messages is not None:
            return "\n".join(str(message.get("content") or "") for message in self.messages)
        return self.prompt if isinstance(self.prompt, str) else ""


def client_sampling(dialect_defaults: SamplingParams, **asked: Any) -> tuple[SamplingParams, frozenset[str]]:
    """A dialect's sampling: the fields the client asked for (None: left out) over the dialect's defaults, and
    which it asked for, so that the model's defaults take the place of the dialect's for the rest
    (GenerationRequest.sampling_given)."""
    given = {name: value for name, value in asked.items() if value is not None}
    return replace(dialect_defaults, **given), frozenset(given)


@dataclass
class Caller:
    """Who asks, as the pipeline needs to know them; built by the HTTP layer for each request."""

    identity: Identity | None
    client_key: str  # whose in-flight limit the request counts against
    record: RequestRecord  # what the access log will say about the request
    disconnected: Callable[[], Awaitable[None]]  # completes when the client goes away
    request: Any  # the framework's request, handed to the plugin hooks as they receive it
