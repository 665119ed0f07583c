"""What a model's KV cache is: its bytes per token (measured, at the dtype or quantization the batch stores),
whether it can be quantized, and a fingerprint of the weights' content for the prompt cache's disk tier."""

from __future__ import annotations

import hashlib
import os
import pathlib
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import BatchKVCache, make_prompt_cache

from forgellm.backends.mlx.kv_rollback import rolls_back_per_row
from forgellm.backends.mlx.quantized_kv import KvQuantization, QuantizedBatchKVCache

_SAMPLE = 1 << 20  # bytes read from each end of each weights file for the fingerprint


def check_quantizable(model: nn.Module, quantization: KvQuantization) -> None:
    """ValueError unless the model's KV cache can be stored quantized in the batch: plain attention at every
    layer (not a sliding window's rotating cache, nor a recurrent state), with heads a whole number of groups."""
    if not rolls_back_per_row(model):
        raise ValueError(
            "--kv-bits needs a model with plain attention at every layer; this one has sliding-window or "
            "recurrent layers (serve it without --kv-bits)"
        )
    try:
        kv_bytes_per_token(model, quantization)
    except ValueError as exc:
        raise ValueError(f"--kv-group-size {quantization.group_size} does not fit this model's heads: {exc}") from None


def kv_bytes_per_token(model: nn.Module, quantization: KvQuantization | None) -> int:
    """One position's bytes in the batch's KV cache, over all layers, measured by running one token (0 for a
    model whose cache is not plain attention: its size does not grow by token)."""
    if not rolls_back_per_row(model):
        return 0
    layers = len(make_prompt_cache(model))
    cache: list[Any]
    if quantization is None:
        cache = [BatchKVCache([0]) for _ in range(layers)]
    else:
        every_position = KvQuantization(quantization.bits, quantization.group_size, start=0)
        cache = [QuantizedBatchKVCache([0], every_position) for _ in range(layers)]
    mx.eval(model(mx.array([[0]]), cache=cache))
    return sum(int(layer.nbytes) for layer in cache) // BatchKVCache.step


def model_fingerprint(source: str, adapter_path: str | None, quantization: KvQuantization | None) -> str:
    """A hash of what a model's KV caches depend on: its weights and adapter (their files' names, sizes, and
    first and last megabyte, so two fine-tunes of one base differ without hashing gigabytes), and the KV form."""
    digest = hashlib.sha256(repr(quantization).encode())
    for location in (source, adapter_path):
        if location is None:
            continue
        directory = _local_directory(location)
        if directory is None:
            digest.update(location.encode())
            continue
        for path in sorted(directory.iterdir()):
            if path.suffix in (".safetensors", ".json") and path.is_file():
                digest.update(path.name.encode())
                _sample_into(digest, path)
    return digest.hexdigest()


def _local_directory(location: str) -> pathlib.Path | None:
    path = pathlib.Path(os.path.expanduser(location))
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return pathlib.Path(snapshot_download(location, local_files_only=True))
    except Exception:  # not a repo in the local Hugging Face cache: the name stands for it
        return None


def _sample_into(digest: Any, path: pathlib.Path) -> None:
    size = path.stat().st_size
    digest.update(size.to_bytes(8, "little"))
    with path.open("rb") as file:
        digest.update(file.read(_SAMPLE))
        if size > 2 * _SAMPLE:
            file.seek(size - _SAMPLE)
            digest.update(file.read(_SAMPLE))
