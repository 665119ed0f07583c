"""A model and tokenizer loaded by mlx-lm's own loader, and the engines that run it."""

from __future__ import annotations

import gc
import json
import logging
import os
import pathlib

import jinja2
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm import load as mlx_load
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.tokenizer_utils import TokenizerWrapper

from forgellm import LAYERED_SAMPLING, Constraint, Engine, LoadedModel, TemplateRefused, checked_sampling_value
from forgellm.backends.mlx.batch_engine import EngineTuning, MlxBatchEngine
from forgellm.backends.mlx.decoding import Decoding
from forgellm.backends.mlx.disk_prompt_cache import DiskPromptCache
from forgellm.backends.mlx.distributed.sharding import Sharding
from forgellm.backends.mlx.kv_footprint import (
    check_quantizable,
    kv_bytes_per_token,
    layer_quantizations,
    model_fingerprint,
)
from forgellm.backends.mlx.kv_rollback import rolls_back_per_row
from forgellm.backends.mlx.output_format import output_format
from forgellm.backends.mlx.prompt_cache import PromptCache
from forgellm.backends.mlx.sequential_engine import MlxSequentialEngine

logger = logging.getLogger("forgellm.mlx")


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


def parameter_bytes(model: nn.Module) -> int:
    weights: list[tuple[str, mx.array]] = tree_flatten(model.parameters())  # type: ignore[assignment]
    return sum(array.nbytes for _, array in weights)


def load_draft_model(path: str, tokenizer: TokenizerWrapper) -> nn.Module:
    """The draft model at path; ValueError unless its tokenizer is the target's (its tokens would mean other
    text) and its cache can roll back per row."""
    draft, draft_tokenizer = mlx_load(path)[:2]
    if draft_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"the draft model {path} has another tokenizer than the model: it cannot draft for it")
    if not rolls_back_per_row(draft):
        raise ValueError(f"the draft model {path} has layers whose cache cannot be rolled back per sequence")
    return draft


class MlxModel(LoadedModel):
    """A model and tokenizer loaded by mlx-lm's own loader (from ``path``, a directory or repo id)."""

    def __init__(
        self,
        name: str,
        adapter_path: str | None,
        tuning: EngineTuning | None = None,
        path: str | None = None,
        tool_parser: str | None = None,
        draft_path: str | None = None,
        sharding: Sharding | None = None,
    ) -> None:
        self.name = name
        self.adapter_path = adapter_path
        self.tuning = tuning or EngineTuning()
        # mlx-lm infers the tool-call parser from the chat template; the tokenizer config overrides that.
        tokenizer_config = {"tool_parser_type": tool_parser} if tool_parser else None
        if sharding is not None:  # this rank's part (the backend refuses adapters and draft models then)
            self.model, self.tokenizer = sharding.load(pathlib.Path(path or name), tokenizer_config)
        else:
            loaded = mlx_load(path or name, tokenizer_config=tokenizer_config, adapter_path=adapter_path)
            self.model, self.tokenizer = loaded[0], loaded[1]
        # mlx-lm batches only models whose every cache layer can be merged across sequences.
        self.batchable = all(hasattr(c, "merge") for c in make_prompt_cache(self.model))
        args = getattr(self.model, "args", None)
        self.vocab_size = int(getattr(args, "vocab_size", 0) or len(self.tokenizer.get_vocab()))
        self.context_length: int | None = getattr(args, "max_position_embeddings", None)
        self.decoding = Decoding(self.tokenizer, self.vocab_size)
        self.output_format = output_format(self.tokenizer)
        self.sampling_defaults = recommended_sampling(pathlib.Path(os.path.expanduser(path or name)))
        self.draft = load_draft_model(draft_path, self.tokenizer) if draft_path else None
        self.memory_bytes = sum(parameter_bytes(model) for model in (self.model, self.draft) if model is not None)
        quantization = self.tuning.kv_quantization
        if quantization is not None:
            check_quantizable(self.model, quantization)
        self.kv_bytes_per_token = kv_bytes_per_token(self.model, quantization if self.batchable else None)
        self.kv_layers = layer_quantizations(self.model, self.tokenizer, quantization) if quantization else None
        self.fingerprint = model_fingerprint(path or name, adapter_path, self.kv_layers)

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

    def create_engine(self, max_batch_size: int, seed: int | None = None) -> Engine:
        """A fresh engine, its random state seeded with seed (every rank of a sharded model gets the same one)."""
        # A failed step can leave MLX's global random state unusable (mlx-lm's compiled samplers trace it),
        # and the scheduler replaces a failed engine with a new one: start each from a fresh state.
        mx.random.seed(int.from_bytes(os.urandom(8), "little") if seed is None else seed)
        if self.batchable:
            tuning = self.tuning
            disk = None
            if tuning.prompt_cache_dir:
                directory = pathlib.Path(os.path.expanduser(tuning.prompt_cache_dir))
                disk = DiskPromptCache(directory, tuning.prompt_cache_disk_bytes, self.fingerprint, self.kv_layers)
            prompt_cache = None
            if tuning.prompt_cache_size > 0:
                prompt_cache = PromptCache(tuning.prompt_cache_size, tuning.prompt_cache_bytes, disk)
            return MlxBatchEngine(
                self.model,
                self.tokenizer,
                self.decoding,
                max_batch_size,
                self.vocab_size,
                tuning,
                self.draft,
                prompt_cache,
                self.kv_bytes_per_token,
                self.kv_layers,
            )
        return MlxSequentialEngine(self.model, self.tokenizer, self.decoding, self.vocab_size)

    def close(self) -> None:
        del self.model, self.tokenizer, self.draft
        gc.collect()
        mx.clear_cache()

    @staticmethod
    def release_thread() -> None:
        """Free the MLX streams the engine thread created; unreleased, they can abort the process at exit."""
        mx.clear_streams()
