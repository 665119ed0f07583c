"""The backend protocol: what the core needs from a generation backend.

A backend loads models. A loaded model tokenizes prompts and creates an engine.
An engine holds many sequences at once and advances all of them one token per
``step()``; the scheduler calls it from one thread only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from forgellm.core.engine.generation import Constraint, GenerationJob, TokenOutput

# A marked tool call's text (between its markers), with the request's tools, as {"name": ..., "arguments": {...}}.
ToolCallParser = Callable[[str, list[dict[str, Any]] | None], dict[str, Any]]


@dataclass(frozen=True)
class OutputFormat:
    """How a model marks the parts of its answer, for the API dialects to split it into content, reasoning
    (``think``: its start and end markers) and tool calls (``tool_call``: markers and a parser)."""

    think: tuple[str, str] | None = None
    tool_call: tuple[str, str] | None = None
    parse_tool_call: ToolCallParser | None = None
    renders_tools: bool = False  # the chat template puts the request's tools into the prompt itself
    # Whether a rendered prompt ends inside a think block (templates of reasoning models may open it), so that
    # the answer starts as reasoning.
    opens_reasoning: Callable[[list[int]], bool] | None = None


class Engine(Protocol):
    def add(self, seq_id: int, job: GenerationJob) -> int:
        """Start generating for a sequence (it joins the batch at the next step); return how many of its
        prompt tokens were served from a cache rather than computed (0 for an engine without one)."""

    def step(self) -> list[TokenOutput]:
        """Advance every sequence by one token; a finished one carries its finish_reason. A sequence whose own
        processing failed carries the error instead, and the engine has dropped it; an exception fails the
        whole batch."""

    def remove(self, seq_ids: Iterable[int]) -> None:
        """Drop sequences (cancelled, or stopped by a stop string) from the batch."""

    def __len__(self) -> int:
        """The number of sequences the engine holds."""

    # Optional: ``cache_bytes()``, the bytes of KV caches the engine holds (running sequences and any
    # prompt cache), counted against --memory-budget; an engine without it counts none.


class LoadedModel(Protocol):
    name: str
    adapter_path: str | None
    vocab_size: int  # token ids run from 0 to vocab_size - 1
    context_length: int | None  # the most tokens, prompt and output, the model was made for (None: unknown)
    output_format: OutputFormat

    @property
    def has_chat_template(self) -> bool: ...

    def encode(self, text: str) -> list[int]:
        """Tokenize raw text as a prompt."""

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        template_options: dict[str, Any] | None = None,
    ) -> list[int]:
        """Tokenize a conversation with the model's chat template, ready for the assistant's turn (the tools in
        OpenAI's function format, and options such as enable_thinking, passed to the template); raise
        TemplateRefused when the template refuses the conversation."""

    def check_constraint(self, constraint: Constraint) -> None:
        """Raise ValueError, saying why, when this model cannot enforce the constraint."""

    def create_engine(self, max_batch_size: int) -> Engine:
        """A fresh engine for this model."""

    def close(self) -> None:
        """Free the model's memory."""

    # Optional: ``release_thread()``, called once on the engine thread as it ends, after the last
    # model is closed, to free per-thread resources (the MLX backend frees its streams there);
    # ``memory_bytes``, the bytes its weights take, counted against --memory-budget; and
    # ``sampling_defaults``, the sampling its makers recommend (generation_config.json), by field name.


class Backend(Protocol):
    # The model `forgellm run` loads when given no --model (None: start with none).
    # Optional: ``device_memory_bytes()``, the memory a --memory-budget fraction is of (0: the machine's RAM).
    default_model: str | None

    def load(self, model_name: str, adapter_path: str | None, progress: Callable[[str], None]) -> LoadedModel:
        """Load a model (and adapter); raise with a clear message when that is impossible.

        Long steps (a fetch, a conversion) report what they are doing through progress(text),
        which status shows while the load runs."""
