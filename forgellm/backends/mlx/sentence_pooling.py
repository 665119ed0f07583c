"""How an embedding model turns its last hidden states into one vector per input, as its sentence-transformers
files declare: ``modules.json`` (the modules in order: the transformer, a pooling, a normalisation) and the
pooling module's ``config.json`` (which poolings, concatenated in sentence-transformers' order).

A model directory without ``modules.json`` gets mean pooling and normalisation, what most embedding
models use (and mlx-embeddings does for all). A declared module this does not implement (a Dense layer,
say) fails the load: vectors that silently skip a module would be wrong.
"""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass

import mlx.core as mx

_TRANSFORMER = "sentence_transformers.models.Transformer"
_POOLING = "sentence_transformers.models.Pooling"
_NORMALIZE = "sentence_transformers.models.Normalize"

# The pooling modes in the order sentence-transformers concatenates them, by their config.json keys.
_MODES = ("cls_token", "max_tokens", "mean_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens", "lasttoken")


@dataclass(frozen=True)
class SentencePooling:
    modes: tuple[str, ...] = ("mean_tokens",)
    normalize: bool = True
    max_seq_length: int | None = None  # sentence_bert_config.json's window, when it sets one

    @classmethod
    def of_directory(cls, directory: pathlib.Path) -> SentencePooling:
        """What the directory's sentence-transformers files declare; ValueError for what cannot be honoured."""
        max_seq_length = _read(directory / "sentence_bert_config.json").get("max_seq_length")
        if not (directory / "modules.json").is_file():
            return cls(max_seq_length=max_seq_length)
        modules = json.loads((directory / "modules.json").read_text(encoding="utf-8"))
        kinds = [module.get("type") for module in modules]
        unknown = [kind for kind in kinds if kind not in (_TRANSFORMER, _POOLING, _NORMALIZE)]
        if unknown or kinds[:1] != [_TRANSFORMER]:
            raise ValueError(
                f"{directory}: modules.json declares {', '.join(map(str, unknown or kinds))}; this server embeds "
                "with a transformer, then pooling and normalisation only"
            )
        modes: tuple[str, ...] = ("cls_token",)  # sentence-transformers' default for a model without pooling
        for module in modules:
            if module.get("type") == _POOLING:
                config = _read(directory / module.get("path", "") / "config.json")
                modes = tuple(mode for mode in _MODES if config.get(f"pooling_mode_{mode}"))
                if not modes:
                    raise ValueError(f"{directory}: the pooling module declares no pooling mode")
        return cls(modes, _NORMALIZE in kinds, max_seq_length)

    def pool(self, hidden: mx.array, mask: mx.array) -> mx.array:
        """One vector per row of hidden (rows, positions, width), counting the positions where mask is 1."""
        mask = mask.astype(hidden.dtype)[..., None]
        counts = mx.maximum(mask.sum(axis=1), 1e-9)
        pooled = []
        for mode in self.modes:
            if mode == "cls_token":
                pooled.append(hidden[:, 0])
            elif mode == "max_tokens":
                pooled.append(mx.where(mask > 0, hidden, -1e9).max(axis=1))
            elif mode == "mean_tokens":
                pooled.append((hidden * mask).sum(axis=1) / counts)
            elif mode == "mean_sqrt_len_tokens":
                pooled.append((hidden * mask).sum(axis=1) / mx.sqrt(counts))
            elif mode == "weightedmean_tokens":
                weights = mx.arange(1, hidden.shape[1] + 1, dtype=hidden.dtype)[None, :, None] * mask
                pooled.append((hidden * weights).sum(axis=1) / mx.maximum(weights.sum(axis=1), 1e-9))
            else:  # lasttoken: each row's last position that counts (rows are padded on the right)
                last = mask[..., 0].sum(axis=1).astype(mx.int32) - 1
                pooled.append(hidden[mx.arange(hidden.shape[0]), last])
        vectors = mx.concatenate(pooled, axis=-1) if len(pooled) > 1 else pooled[0]
        if self.normalize:
            vectors = vectors / mx.maximum(mx.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)
        return vectors


def _read(path: pathlib.Path) -> dict:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    return config if isinstance(config, dict) else {}
