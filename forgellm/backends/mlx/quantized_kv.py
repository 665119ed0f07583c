"""A quantized KV cache that keeps batching: mlx-lm's BatchKVCache with its keys and values stored as
``mx.quantize`` gives them (packed integers, a scale and a bias per group), dequantized on read.

mlx-lm's own QuantizedKVCache holds one sequence, so mlx_lm.server serves one request at a time with
``--kv-bits``. Here the batched cache stores each position quantized once, and every row operation the
batch needs (joining, leaving, extracting a finished row, rolling back rejected drafts) works on the
stored parts as it does on plain arrays.

Attention reads the values dequantized. Measured on the 2-core CPU (batch 8, 3 KV heads of 64, 2,000
positions, per layer): float attention 5.6 ms; attention on the quantized values (mlx-lm's
``quantized_scaled_dot_product_attention``) 27 ms at 8 bits; ``mx.dequantize`` then attention 40 ms;
the byte-view dequantization below then attention 9.6 ms. On a GPU ``mx.dequantize`` is one fused kernel.

``start`` is mlx-lm's ``--quantized-kv-start``: a batch cache holds full precision until it holds more
than that many positions, then quantizes what it holds and stays quantized.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx.utils import tree_map, tree_reduce
from mlx_lm.models.cache import BatchKVCache, KVCache, dynamic_roll

KV_BITS_CHOICES = (4, 8)
KV_GROUP_SIZE_CHOICES = (32, 64, 128)  # what mx.quantize takes

# Keys or values: one array at full precision, or mx.quantize's (packed, scales, biases).
Stored = Any


@dataclass(frozen=True)
class KvQuantization:
    bits: int
    group_size: int = 64
    start: int = 0

    @classmethod
    def chosen(cls, bits: int | None, group_size: int | None, start: int) -> KvQuantization | None:
        """The quantization the options choose (None: the model's dtype). Unless set, groups are of 64 at 8
        bits (mlx-lm's default) and of 32 at 4, as llama.cpp's 4-bit blocks are: 4 bits in groups of 64 cost
        SmolLM2 12.8% perplexity, in groups of 32 2.7%, for 20% more bytes (docs/kv-cache.md)."""
        if not bits:
            return None
        return cls(bits, group_size or (32 if bits == 4 else 64), start)

    def bytes_per_element(self, dtype_size: int) -> float:
        """Stored bytes per key or value element: the packed bits, and a scale and a bias per group."""
        return self.bits / 8 + 2 * dtype_size / self.group_size


@dataclass(frozen=True, eq=False)
class LayerQuantization:
    """One layer's quantization: the settings, and a scale per channel of its keys and of its values (None: 1).

    A group's range is set by its largest element, so a channel that is always large (keys have a few) costs
    every other channel of the group its precision. Dividing each channel by its typical size before
    quantizing, and multiplying back after, evens the ranges out (kv_footprint.layer_quantizations measures
    them). On SmolLM2 it took 8-bit greedy answers identical to full precision's from 72% to 91%, and 4-bit
    perplexity's rise from 32.6% to 12.8% (docs/kv-cache.md)."""

    settings: KvQuantization
    key_scale: mx.array | None = None
    value_scale: mx.array | None = None


def _quantize(array: mx.array, settings: KvQuantization, scale: mx.array | None) -> tuple[mx.array, ...]:
    if scale is not None:
        array = array / scale
    packed, scales, biases = mx.quantize(array, group_size=settings.group_size, bits=settings.bits)
    return packed, scales, biases


def _dequantize(parts: tuple[mx.array, ...], settings: KvQuantization, scale: mx.array | None) -> mx.array:
    packed, scales, biases = parts
    if mx.default_device().type == mx.DeviceType.gpu:
        values = mx.dequantize(packed, scales, biases, group_size=settings.group_size, bits=settings.bits)
    else:
        # The packed words as bytes, in element order (8 bits: one element a byte; 4 bits: low nibble first).
        codes = packed.view(mx.uint8)
        if settings.bits == 4:
            codes = mx.stack([codes & 15, codes >> 4], axis=-1)
        groups = codes.reshape(*scales.shape, settings.group_size).astype(scales.dtype)
        values = (groups * scales[..., None] + biases[..., None]).reshape(*scales.shape[:-1], -1)
    return values * scale if scale is not None else values


def _is_quantized(stored: Stored) -> bool:
    return isinstance(stored, tuple)


def _nbytes(stored: Stored) -> int:
    if stored is None:
        return 0
    return int(tree_reduce(lambda total, array: total + array.nbytes, stored, 0))


class QuantizableKVCache(KVCache):
    """One sequence's cache, as the batch extracts it and the prompt cache keeps it: full precision or
    quantized, as its batch held it. Rows of this class merge into a QuantizedBatchKVCache."""

    keys: Stored
    values: Stored

    def __init__(self, layer: LayerQuantization) -> None:
        super().__init__()
        self.layer = layer

    @classmethod
    def merge(cls, caches: list[QuantizableKVCache]) -> QuantizedBatchKVCache:  # type: ignore[override]
        return QuantizedBatchKVCache.from_rows(caches)

    @property
    def nbytes(self) -> int:
        return _nbytes(self.keys) + _nbytes(self.values)

    def quantized(self) -> QuantizableKVCache:
        """This row with its positions quantized (itself, if they already are)."""
        if self.keys is None or _is_quantized(self.keys):
            return self
        layer = self.layer
        row = QuantizableKVCache(layer)
        row.keys = _quantize(self.keys[..., : self.offset, :], layer.settings, layer.key_scale)
        row.values = _quantize(self.values[..., : self.offset, :], layer.settings, layer.value_scale)
        row.offset = self.offset
        return row


class QuantizedBatchKVCache(BatchKVCache):
    """mlx-lm's BatchKVCache, with its positions stored quantized once it holds more than settings.start.

    It has no ``bits`` attribute on purpose: mlx-lm's attention would then run on the quantized values,
    which is the slower way on a CPU (the module's docstring has the figures)."""

    keys: Stored
    values: Stored

    def __init__(self, left_padding: list[int], layer: LayerQuantization) -> None:
        super().__init__(left_padding)
        self.layer = layer

    @classmethod
    def from_rows(cls, rows: list[QuantizableKVCache]) -> QuantizedBatchKVCache:
        layer = rows[0].layer
        lengths = [row.offset if row.keys is not None else 0 for row in rows]
        longest = max(lengths)
        batch = cls([longest - length for length in lengths], layer)
        if longest == 0:
            return batch
        quantize = longest > layer.settings.start or any(_is_quantized(row.keys) for row in rows)
        converted = [row.quantized() if quantize else row for row in rows]
        template = next(row for row in converted if row.keys is not None)

        def stacked(take: Any) -> Stored:
            shaped = tree_map(lambda a: mx.zeros((len(rows), a.shape[1], longest, a.shape[3]), a.dtype), take(template))
            for i, row in enumerate(converted):
                if row.keys is None:
                    continue
                start = longest - lengths[i]
                for target, part in zip(_parts(shaped), _parts(take(row)), strict=True):
                    target[i : i + 1, :, start:longest] = part[..., : lengths[i], :]
            return shaped

        batch.keys = stacked(lambda row: row.keys)
        batch.values = stacked(lambda row: row.values)
        batch.offset = batch.offset + longest
        batch._idx = longest
        return batch

    @property
    def quantized(self) -> bool:
        return _is_quantized(self.keys)

    def _capacity(self) -> int:
        return _parts(self.keys)[0].shape[2] if self.keys is not None else 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        if not self.quantized:
            fetched = super().update_and_fetch(keys, values)
            if self._idx <= self.layer.settings.start:
                return fetched
            self._quantize_held()
            return self.keys_and_values()
        previous, count = self._idx, keys.shape[2]
        if previous + count > self._capacity():
            steps = (self.step + count - 1) // self.step * self.step

            def grown(part: mx.array) -> mx.array:
                part = part[..., :previous, :]
                extra = mx.zeros((*part.shape[:2], steps, part.shape[3]), part.dtype)
                return mx.concatenate([part, extra], axis=2)

            self.keys, self.values = tree_map(grown, (self.keys, self.values))
        layer = self.layer
        for stored, new, scale in ((self.keys, keys, layer.key_scale), (self.values, values, layer.value_scale)):
            for target, part in zip(stored, _quantize(new, layer.settings, scale), strict=True):
                target[..., previous : previous + count, :] = part
        self._idx += count
        self.offset = self.offset + count
        return self.keys_and_values()

    def _quantize_held(self) -> None:
        # The whole buffer, so it keeps its room for the positions to come.
        layer = self.layer
        self.keys = _quantize(self.keys, layer.settings, layer.key_scale)
        self.values = _quantize(self.values, layer.settings, layer.value_scale)

    def keys_and_values(self) -> tuple[mx.array, mx.array]:
        if not self.quantized:
            return super().keys_and_values()  # type: ignore[no-any-return]
        held = tree_map(lambda part: part[..., : self._idx, :], (self.keys, self.values))
        layer = self.layer
        return (
            _dequantize(held[0], layer.settings, layer.key_scale),
            _dequantize(held[1], layer.settings, layer.value_scale),
        )

    def finalize(self) -> None:
        if self._right_padding is not None:
            padding = self._right_padding[:, None]
            self.keys, self.values = tree_map(lambda a: dynamic_roll(a, padding, axis=2), (self.keys, self.values))
            self.offset = self.offset - self._right_padding
            self.left_padding += self._right_padding
            self._right_padding = None

    def filter(self, batch_indices: Any) -> None:
        if self.keys is not None:
            self.keys, self.values = tree_map(lambda a: a[batch_indices], (self.keys, self.values))
        self.offset = self.offset[batch_indices]
        self.left_padding = self.left_padding[batch_indices]
        shift: int = self.left_padding.min().item()  # type: ignore[assignment]
        if shift > 0:
            if self.keys is not None:
                self.keys, self.values = tree_map(lambda a: a[..., shift:, :], (self.keys, self.values))
            self._idx -= shift
            self.left_padding -= shift

    def extend(self, other: QuantizedBatchKVCache) -> None:  # type: ignore[override]
        if self.quantized and other.keys is not None and not other.quantized:
            other._quantize_held()
        elif other.quantized and self.keys is not None and not self.quantized:
            self._quantize_held()
        if self.keys is None and other.keys is None:
            self.left_padding = mx.concatenate([self.left_padding, other.left_padding])
            self.offset = mx.concatenate([self.offset, other.offset])
            return
        longest = max(self._idx, other._idx)
        size = max(c._capacity() for c in (self, other))
        like_keys = self.keys if self.keys is not None else other.keys
        like_values = self.values if self.values is not None else other.values

        def padded(cache: QuantizedBatchKVCache, stored: Stored, like: Stored) -> Stored:
            rows, left = cache.offset.shape[0], longest - cache._idx
            if stored is None:
                stored = tree_map(lambda a: mx.zeros((rows, a.shape[1], 0, a.shape[3]), a.dtype), like)

            def pad(part: mx.array) -> mx.array:
                right = size - part.shape[2] - left
                if right < 0:
                    part, right = part[..., :right, :], 0
                return mx.pad(part, [(0, 0), (0, 0), (left, right), (0, 0)]) if left or right else part

            return tree_map(pad, stored)

        def joined(a: mx.array, b: mx.array) -> mx.array:
            return mx.concatenate([a, b])

        self.keys = tree_map(joined, padded(self, self.keys, like_keys), padded(other, other.keys, like_keys))
        self.values = tree_map(joined, padded(self, self.values, like_values), padded(other, other.values, like_values))
        self.offset = mx.concatenate([self.offset, other.offset])
        self.left_padding = mx.concatenate(
            [self.left_padding + longest - self._idx, other.left_padding + longest - other._idx]
        )
        self._idx = longest

    def extract(self, idx: int) -> QuantizableKVCache:  # type: ignore[override]
        mx.eval(self.left_padding)
        padding: int = self.left_padding[idx].item()  # type: ignore[assignment]
        row = QuantizableKVCache(self.layer)
        row.keys, row.values = tree_map(
            lambda a: mx.contiguous(a[idx : idx + 1, :, padding : self._idx]), (self.keys, self.values)
        )
        row.offset = self._idx - padding
        return row

    @property
    def nbytes(self) -> int:
        return _nbytes(self.keys) + _nbytes(self.values)


def _parts(stored: Stored) -> list[mx.array]:
    return list(stored) if _is_quantized(stored) else [stored]
