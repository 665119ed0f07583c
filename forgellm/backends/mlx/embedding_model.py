"""An embedding model (an encoder of the BERT family) loaded by mlx-embeddings, pooled and normalised as its
sentence-transformers files declare (``sentence_pooling``).

mlx-embeddings is the maintained MLX library for encoder models; its models return their last hidden
states, and the vectors are pooled here because its own pooling is always mean-then-normalise, whatever
the model declares. The tokenizer is the model's own, through transformers (as mlx-embeddings loads it).
"""

from __future__ import annotations

import gc
import json
import pathlib
import threading

import mlx.core as mx
from mlx_embeddings.utils import load_model
from transformers import AutoTokenizer

from forgellm import EmbeddingModel
from forgellm.backends.mlx.cpu_gelu import vectorize_gelus
from forgellm.backends.mlx.model import parameter_bytes
from forgellm.backends.mlx.sentence_pooling import SentencePooling

# Encoder architectures (config.json's model_type) that mlx-embeddings runs and mlx-lm does not.
ENCODER_TYPES = frozenset({"bert", "xlm-roberta", "modernbert"})


def is_embedding_model(directory: pathlib.Path) -> bool:
    """Whether a model directory holds an embedding model: it has sentence-transformers' modules.json, or its
    architecture is an encoder's."""
    if (directory / "modules.json").is_file():
        return True
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("model_type") in ENCODER_TYPES


class MlxEmbeddingModel(EmbeddingModel):
    """An encoder model from a local directory, as mlx-embeddings loads it."""

    def __init__(self, name: str, directory: pathlib.Path) -> None:
        self.name = name
        self.adapter_path = None
        self.pooling = SentencePooling.of_directory(directory)
        self.model = load_model(directory, path_to_repo=str(directory))
        if mx.default_device().type == mx.DeviceType.cpu:
            vectorize_gelus(self.model)  # MLX's CPU erf is scalar: two thirds of a BERT pass there
        self.tokenizer = AutoTokenizer.from_pretrained(str(directory))
        self._tokenizing = threading.Lock()  # a fast tokenizer is not safe to share between threads
        config = self.model.config
        self.vocab_size = int(config.vocab_size)
        windows = [config.max_position_embeddings, self.pooling.max_seq_length]
        self.context_length: int = min(int(window) for window in windows if window)
        self.pad_id = self.tokenizer.pad_token_id or 0
        # The token that ends every input ([SEP]), kept last when an input is cut to the window.
        empty = self.tokenizer("")["input_ids"]
        self.end_token = empty[-1] if empty and empty[-1] in self.tokenizer.all_special_ids else None
        self.dimensions = len(self.embed([empty or [self.pad_id]])[0])
        self.memory_bytes = parameter_bytes(self.model)

    def encode(self, text: str) -> list[int]:
        with self._tokenizing:
            return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def truncated(self, tokens: list[int]) -> list[int]:
        window = self.context_length
        if len(tokens) <= window:
            return tokens
        if self.end_token is not None and tokens[-1] == self.end_token:
            return [*tokens[: window - 1], self.end_token]
        return tokens[:window]

    def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        """The inputs in one forward pass, each row padded on the right to the longest."""
        longest = max(len(tokens) for tokens in inputs)
        ids = mx.array([tokens + [self.pad_id] * (longest - len(tokens)) for tokens in inputs], dtype=mx.int32)
        mask = mx.array([[1] * len(tokens) + [0] * (longest - len(tokens)) for tokens in inputs], dtype=mx.int32)
        hidden = self.model(ids, attention_mask=mask).last_hidden_state
        rows: list[list[float]] = self.pooling.pool(hidden, mask).astype(mx.float32).tolist()  # type: ignore[assignment]
        return rows

    def close(self) -> None:
        del self.model
        gc.collect()
        mx.clear_cache()

    @staticmethod
    def release_thread() -> None:
        mx.clear_streams()
