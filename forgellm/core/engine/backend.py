"""What the core needs from a generation backend, as base classes: subclass them, implement the abstract
members, and override the others where the backend knows better than their defaults.

A backend loads models and says what a model name is (a file, a directory, a name it knows). A loaded
model tokenizes prompts and creates engines. An engine holds many sequences at once and advances all
of them one token per ``step()``; the scheduler calls it from one thread only.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from forgellm.core.engine.generation import Constraint, GenerationJob, TokenOutput
from forgellm.core.errors import TemplateRefused

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


@dataclass(frozen=True)
class CacheStats:
    """What an engine's KV caches hold: the running batch's, and the prompt cache's tiers (kept for later
    prompts that share a prefix: in memory, and on disk where the backend has a tier there)."""

    kv_bytes_per_token: int = 0  # one position of one sequence in the running batch
    kv_in_use: int = 0  # the running batch's KV cache
    memory_bytes: int = 0  # the prompt cache's in-memory tier
    memory_entries: int = 0
    disk_bytes: int = 0
    disk_entries: int = 0
    lookups: int = 0  # prompts looked up in the prompt cache
    memory_hits: int = 0  # of those, served a prefix from memory
    disk_hits: int = 0  # of those, served a prefix from disk


class Engine(ABC):
    @abstractmethod
    def add(self, seq_id: int, job: GenerationJob) -> int:
        """Start generating for a sequence (it joins the batch at the next step); return how many of its
        prompt tokens were served from a cache rather than computed (0 for an engine without one)."""

    @abstractmethod
    def step(self) -> list[TokenOutput]:
        """Advance every sequence by one token; a finished one carries its finish_reason. A sequence whose own
        processing failed carries the error instead, and the engine has dropped it; an exception fails the
        whole batch."""

    @abstractmethod
    def remove(self, seq_ids: Iterable[int]) -> None:
        """Drop sequences (cancelled, or stopped by a stop string) from the batch."""

    @abstractmethod
    def __len__(self) -> int:
        """The number of sequences the engine holds."""

    def cache_stats(self) -> CacheStats:
        """What the engine's KV caches hold (all zero for an engine that does not say)."""
        return CacheStats()

    def cache_bytes(self) -> int:
        """The bytes of KV caches the engine holds (running sequences and any prompt cache), counted against
        --memory-budget."""
        stats = self.cache_stats()
        return stats.kv_in_use + stats.memory_bytes

    def kv_bytes(self, rows: int, longest: int) -> int:
        """The most bytes the running batch's KV cache can take with this many sequences, the longest of them
        reaching ``longest`` tokens (prompt and output), for admission against --memory-budget; 0: unknown,
        and then sequences are admitted by count only. Called from any thread: keep it arithmetic."""
        return 0

    def release_cache(self, nbytes: int) -> None:
        """Let go of at least nbytes of the prompt cache's memory tier, least recently used first (to disk,
        where there is a tier there), to make room for running sequences."""
        return None

    def close(self) -> None:
        """Free what the engine holds."""
        return None


class LoadedModel(ABC):
    name: str
    adapter_path: str | None
    vocab_size: int  # token ids run from 0 to vocab_size - 1
    context_length: int | None  # the most tokens, prompt and output, the model was made for (None: unknown)
    output_format: OutputFormat
    memory_bytes: int = 0  # the bytes its weights take, counted against --memory-budget
    # The sampling its makers recommend (generation_config.json), by field name (LAYERED_SAMPLING).
    sampling_defaults: Mapping[str, float] = MappingProxyType({})

    @property
    @abstractmethod
    def has_chat_template(self) -> bool: ...

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Tokenize raw text as a prompt."""

    @abstractmethod
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

    @abstractmethod
    def check_constraint(self, constraint: Constraint) -> None:
        """Raise ValueError, saying why, when this model cannot enforce the constraint."""

    @abstractmethod
    def create_engine(self, max_batch_size: int) -> Engine:
        """A fresh engine for this model."""

    def close(self) -> None:
        """Free the model's memory."""
        return None

    @staticmethod
    def release_thread() -> None:
        """Called once on the engine thread as it ends, after the last model is closed, to free per-thread
        resources (the MLX backend frees its streams there). Static: the thread keeps it past its models."""
        return None


class EmbeddingModel(LoadedModel):
    """A loaded model that turns inputs into vectors and generates nothing (an encoder such as BERT). Its
    encode() gives a text's tokens as it embeds them (its special tokens included); context_length bounds
    an input's tokens."""

    dimensions: int  # the length of its vectors
    output_format = OutputFormat()

    @abstractmethod
    def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        """One vector per input (each of at most context_length tokens, none empty), pooled and normalised as
        the model's files declare; called on the model's engine thread with the inputs of many requests."""

    @abstractmethod
    def truncated(self, tokens: list[int]) -> list[int]:
        """An encoded input cut to context_length tokens, keeping the tokens that end every input."""

    @property
    def has_chat_template(self) -> bool:
        return False

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        template_options: dict[str, Any] | None = None,
    ) -> list[int]:
        raise TemplateRefused(f"{self.name} is an embedding model: it has no chat")

    def check_constraint(self, constraint: Constraint) -> None:
        raise ValueError(f"{self.name} is an embedding model: it generates nothing to constrain")

    def create_engine(self, max_batch_size: int) -> Engine:
        raise TypeError(f"{self.name} is an embedding model: it generates nothing")


@dataclass(frozen=True)
class ModelSource:
    """What a model name is, as the backend that would load it sees it."""

    kind: Literal["file", "directory", "name"]  # a local file or directory, or a name the backend resolves
    what: str  # what it is, in words, for messages ("GGUF file", "Model directory", "Model")
    exists: bool  # for a file or directory: whether it is there (a name: True)
    size_bytes: int  # what loading it is expected to take (its weights' files); 0: unknown
    key: str  # one key for every spelling of the same source (a local path's real path)


@dataclass(frozen=True)
class Rank:
    """One process of a model served by several (a rank of a distributed group): where it runs, and what it
    last reported holding."""

    rank: int
    host: str
    weights_bytes: int = 0  # its part of the models' weights
    memory_bytes: int = 0  # the memory its framework holds now
    peak_memory_bytes: int = 0
    sequences: int = 0  # the sequences its engines hold


class Backend(ABC):
    # The model `forgellm run` loads when given no --model (None: start with none).
    default_model: str | None = None

    def follow(self) -> int | None:
        """When this process is not the one that serves HTTP (a rank other than 0 of a model sharded over
        processes), do its part until the group ends and return the process's exit status; None: serve."""
        return None

    def ranks(self) -> tuple[Rank, ...]:
        """The processes the backend's models are spread over, this one first (none: it runs alone)."""
        return ()

    def unavailable(self) -> str | None:
        """Why the backend cannot generate at all now (a rank of its group was lost), as a sentence for a 503;
        None: it can."""
        return None

    def close(self) -> None:
        """Called once as the server stops, after every model is unloaded."""
        return None

    def pullable(self) -> Mapping[str, str]:
        """The model names the backend fetches by name (built-in models), each with what it is in words."""
        return {}

    def pull(self, name: str, progress: Callable[[str], None]) -> None:
        """Fetch a pullable model ahead of its first load, reporting long steps through progress(text); raise
        with a clear message when that is impossible."""
        raise ValueError(f"{name} is not a model this backend fetches by name")

    @abstractmethod
    def load(self, model_name: str, adapter_path: str | None, progress: Callable[[str], None]) -> LoadedModel:
        """Load a model (and adapter); raise with a clear message when that is impossible.

        Long steps (a fetch, a conversion) report what they are doing through progress(text),
        which status shows while the load runs."""

    def device_memory_bytes(self) -> int:
        """The memory a --memory-budget fraction is of (0: the machine's RAM)."""
        return 0

    def describe_source(self, name: str) -> ModelSource:
        """What a model name is. By default: a local directory when the name is one, or looks like a path (it
        starts with / . or ~, or has more than one /), else a name (a Hugging Face repo id is owner/name)."""
        path = Path(os.path.expanduser(name))
        exists = on_disk(path, Path.exists)
        if not (name.startswith(("/", ".", "~")) or name.count("/") > 1 or exists):
            return ModelSource("name", "Model", True, 0, name)
        is_dir = on_disk(path, Path.is_dir)
        size = weights_bytes(path) if is_dir else 0
        return ModelSource("directory", "Model directory", is_dir, size, os.path.realpath(path) if exists else name)


def on_disk(path: Path, test: Callable[[Path], bool]) -> bool:
    """test(path); a name the OS cannot even look up (longer than a file name may be) is nothing on disk."""
    try:
        return test(path)
    except (OSError, RuntimeError, ValueError):
        return False


def weights_bytes(directory: Path) -> int:
    """A model directory's weights on disk (its safetensors files): about what loading it takes."""
    try:
        return sum(file.stat().st_size for file in directory.glob("*.safetensors"))
    except OSError:
        return 0
