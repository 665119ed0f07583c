"""What a model's KV cache is: its bytes per token (measured, at the dtype or quantization the batch stores),
whether it can be quantized, and a fingerprint of the weights' content for the prompt cache's disk tier."""

from __future__ import annotations

import hashlib
import math
import os
import pathlib
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import BatchKVCache, make_prompt_cache

from forgellm.backends.mlx.kv_rollback import rolls_back_per_row
from forgellm.backends.mlx.quantized_kv import KvQuantization, LayerQuantization, QuantizedBatchKVCache

_SAMPLE = 1 << 20  # bytes read from each end of each weights file for the fingerprint
# The text each channel's typical size is measured on: prose, code, numbers and a chat turn.
CALIBRATION_TEXT = (
    "The committee met on 14 March 2024 to review the budget. Revenue rose 12.5% to $3.2 million, while "
    "costs fell. def mean(values):\n    return sum(values) / len(values)\n\nUser: Can you explain recursion "
    "simply?\nAssistant: A function that calls itself on a smaller part of the problem until it is trivial. "
    "Rivers, mountains and forests cover most of the region; the climate is mild and wet in winter."
)


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
        every_position = LayerQuantization(KvQuantization(quantization.bits, quantization.group_size, start=0))
        cache = [QuantizedBatchKVCache([0], every_position) for _ in range(layers)]
    mx.eval(model(mx.array([[0]]), cache=cache))
    return sum(int(layer.nbytes) for layer in cache) // BatchKVCache.step


def layer_quantizations(model: nn.Module, tokenizer: Any, quantization: KvQuantization) -> list[LayerQuantization]:
    """Each layer's quantization, with the typical size of each channel of its keys and values, measured on
    CALIBRATION_TEXT. Any scale keeps the cache correct (it is divided out and multiplied back); a good one
    keeps it precise. A key channel's scale is its rotary pair's (channels i and i + D/2 trade magnitude as
    positions rotate them), so positions the text did not reach are covered."""
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([tokenizer.encode(CALIBRATION_TEXT)]), cache=cache))
    layers = []
    for layer in cache:
        keys, values = layer.keys[..., : layer.offset, :], layer.values[..., : layer.offset, :]
        layers.append(LayerQuantization(quantization, _channel_scale(keys, paired=True), _channel_scale(values)))
    return layers


def _channel_scale(held: mx.array, paired: bool = False) -> mx.array:
    largest = mx.max(mx.abs(held), axis=(0, 2))  # per head and channel
    if paired:
        half = largest.shape[-1] // 2
        pair = mx.maximum(largest[:, :half], largest[:, half:])
        largest = mx.concatenate([pair, pair], axis=-1)
    # A channel the text barely touched is not blown up past the head's others when it is used.
    floor = 0.01 * mx.max(largest, axis=-1, keepdims=True) + 1e-6
    return mx.maximum(largest, floor)[None, :, None, :].astype(held.dtype)


def perplexity_through_cache(model: nn.Module, tokens: list[int], layers: list[LayerQuantization] | None) -> float:
    """The tokens' perplexity, decoded one token at a time so that every key and value is read back from the
    batch's cache (quantized with layers, else at the model's dtype): what the cache costs in quality."""
    if layers is None:
        cache: list[Any] = [BatchKVCache([0]) for _ in make_prompt_cache(model)]
    else:
        cache = [QuantizedBatchKVCache([0], layer) for layer in layers]
    nll = 0.0
    for position in range(len(tokens) - 1):
        logits = model(mx.array([[tokens[position]]]), cache=cache)[0, -1].astype(mx.float32)
        nll -= (logits - mx.logsumexp(logits)).tolist()[tokens[position + 1]]
    return math.exp(nll / (len(tokens) - 1))


def model_fingerprint(source: str, adapter_path: str | None, layers: list[LayerQuantization] | None) -> str:
    """A hash of what a model's KV caches depend on: its weights and adapter (their files' names, sizes, and
    first and last megabyte, so two fine-tunes of one base differ without hashing gigabytes), and the KV form
    (the quantization and its channel scales)."""
    digest = hashlib.sha256(repr(layers[0].settings if layers else None).encode())
    for layer in layers or ():
        for scale in (layer.key_scale, layer.value_scale):
            if scale is not None:
                digest.update(repr(scale.astype(mx.float32).tolist()).encode())
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
