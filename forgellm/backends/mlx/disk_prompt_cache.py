"""The prompt cache's disk tier (--prompt-cache-dir): finished sequences' KV caches as safetensors files, so a
prompt whose prefix was prefilled before a restart or a model swap loads that prefix instead of computing it.

One file per cached token sequence, in a folder per model (its fingerprint: the weights' content and the KV
cache's form). A file's metadata holds the format version, the fingerprint and the tokens; its name is a hash
of the fingerprint and the tokens, so a file that does not match its own name is foreign. Files are written
under a temporary name and renamed into place, so a reader (this server or another sharing the folder) sees a
whole file or none. Anything that fails to read or to match is removed, never used. The folder stays under
--prompt-cache-disk-bytes, the least recently used files (by modification time, renewed on each use) going
first.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
from mlx_lm.models.cache import KVCache
from mlx_lm.utils import common_prefix_len

from forgellm.backends.mlx.quantized_kv import LayerQuantization, QuantizableKVCache

logger = logging.getLogger("forgellm.mlx")

FORMAT_VERSION = "forgellm-prompt-cache-1"
SUFFIX = ".safetensors"
_HEADER_LIMIT = 64 << 20  # a larger header is not one this module wrote


@dataclass
class _Entry:
    tokens: tuple[int, ...]
    size: int


def read_metadata(path: Path) -> dict[str, str]:
    """A safetensors file's ``__metadata__``, from its header alone (the format: a little-endian u64 length, then
    that much JSON), without reading its tensors."""
    with path.open("rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        if length > _HEADER_LIMIT:
            raise ValueError("header too large")
        header = json.loads(file.read(length))
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict):
        raise ValueError("no metadata")
    return metadata


class DiskPromptCache:
    def __init__(self, directory: Path, max_bytes: int, fingerprint: str, layers: list[LayerQuantization] | None):
        self._root = directory
        self._dir = directory / fingerprint[:32]
        self._dir.mkdir(parents=True, exist_ok=True)
        self._max_bytes = max_bytes
        self._fingerprint = fingerprint
        self._layers = layers  # each layer's quantization; None: the model's dtype
        self._entries: dict[str, _Entry] = {}  # by file name

    # -- what is there --------------------------------------------------------------------------------
    def _name(self, tokens: tuple[int, ...]) -> str:
        digest = hashlib.sha256(self._fingerprint.encode())
        digest.update(struct.pack(f"<{len(tokens)}q", *tokens))
        return digest.hexdigest()[:40] + SUFFIX

    def _remove(self, name: str, why: str) -> None:
        logger.warning("prompt cache: removing %s (%s)", self._dir / name, why)
        self._entries.pop(name, None)
        with contextlib.suppress(OSError):
            (self._dir / name).unlink()

    def _refresh(self) -> None:
        """Take in files other servers wrote, and forget those that are gone."""
        try:
            present = {p.name: p for p in self._dir.iterdir() if p.name.endswith(SUFFIX) and not p.name.startswith(".")}
        except OSError:
            present = {}
        for name in list(self._entries):
            if name not in present:
                del self._entries[name]
        for name, path in present.items():
            if name in self._entries:
                continue
            try:
                metadata = read_metadata(path)
                tokens = tuple(json.loads(metadata["tokens"]))
                problem = self._mismatch(name, metadata, tokens)
                size = path.stat().st_size
            except FileNotFoundError:
                continue  # removed meanwhile
            except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
                self._remove(name, f"unreadable: {exc}")
                continue
            if problem:
                self._remove(name, problem)
            else:
                self._entries[name] = _Entry(tokens, size)

    def _mismatch(self, name: str, metadata: dict[str, str], tokens: tuple[int, ...]) -> str | None:
        if metadata.get("format") != FORMAT_VERSION:
            return f"format {metadata.get('format')!r}, not {FORMAT_VERSION}"
        if metadata.get("fingerprint") != self._fingerprint:
            return "written for another model"
        if self._name(tokens) != name:
            return "its name does not match its tokens"
        return None

    @property
    def nbytes(self) -> int:
        return sum(entry.size for entry in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    # -- reading --------------------------------------------------------------------------------------
    def longest_prefix(self, prompt: list[int]) -> tuple[str, int] | None:
        """The file sharing the longest prefix with prompt, and that prefix's length."""
        self._refresh()
        best: tuple[str, int] | None = None
        for name, entry in self._entries.items():
            shared = common_prefix_len(entry.tokens, prompt)
            if shared and (best is None or shared > best[1]):
                best = (name, shared)
        return best

    def load(self, name: str, keep: int) -> list[Any] | None:
        """The file's cache, trimmed to its first keep positions; None (and the file removed) if it is unusable."""
        path = self._dir / name
        try:
            arrays, metadata = cast(
                tuple[dict[str, mx.array], dict[str, str]], mx.load(str(path), return_metadata=True)
            )
            tokens = tuple(json.loads(metadata["tokens"]))
            problem = self._mismatch(name, metadata, tokens)
            if problem:
                self._remove(name, problem)
                return None
            cache = self._rows(arrays, int(metadata["layers"]), len(tokens))
            mx.eval(list(arrays.values()))
        except FileNotFoundError:
            self._entries.pop(name, None)
            return None
        except Exception as exc:  # a truncated or corrupt file fails here in many ways; none may reach the request
            self._remove(name, f"unreadable: {exc}")
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # recently used
        for layer in cache:
            layer.trim(layer.offset - keep)
        return cache

    def _rows(self, arrays: dict[str, mx.array], layers: int, length: int) -> list[Any]:
        cache = []
        for layer in range(layers):
            keys = _stored(arrays, f"{layer}.keys")
            values = _stored(arrays, f"{layer}.values")
            row: KVCache = QuantizableKVCache(self._layers[layer]) if self._layers else KVCache()
            if isinstance(keys, tuple) and self._layers is None:
                raise ValueError("quantized, for a cache that is not")
            for stored in (keys, values):
                first = stored[0] if isinstance(stored, tuple) else stored
                if first.ndim != 4 or first.shape[2] != length:
                    raise ValueError(f"layer {layer} holds {first.shape}, not {length} positions")
            row.keys, row.values, row.offset = keys, values, length
            cache.append(row)
        return cache

    # -- writing --------------------------------------------------------------------------------------
    def store(self, tokens: list[int], cache: list[Any]) -> None:
        """Write a finished sequence's cache (unless the same tokens are there), then keep the folder in bounds."""
        key = tuple(tokens)
        name = self._name(key)
        path = self._dir / name
        if path.exists():
            with contextlib.suppress(OSError):
                os.utime(path)
            return
        arrays: dict[str, mx.array] = {}
        for layer, row in enumerate(cache):
            for kind, stored in (("keys", row.keys), ("values", row.values)):
                parts = stored if isinstance(stored, tuple) else (stored,)
                for index, part in enumerate(parts):
                    arrays[f"{layer}.{kind}.{index}"] = part[..., : row.offset, :]
        metadata = {
            "format": FORMAT_VERSION,
            "fingerprint": self._fingerprint,
            "tokens": json.dumps(list(key)),
            "layers": str(len(cache)),
        }
        descriptor, temporary = tempfile.mkstemp(prefix=".", suffix=SUFFIX, dir=self._dir)
        os.close(descriptor)
        try:
            mx.save_safetensors(temporary, arrays, metadata=metadata)
            os.replace(temporary, path)
        except OSError as exc:
            logger.warning("prompt cache: could not write %s: %s", path, exc)
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            return
        self._entries[name] = _Entry(key, path.stat().st_size)
        self._bound()

    def _bound(self) -> None:
        """Remove the least recently used files, of every model in the folder, until it fits its byte bound."""
        files = []
        for path in self._root.glob(f"*/*{SUFFIX}"):
            with contextlib.suppress(OSError):
                status = path.stat()
                files.append((status.st_mtime, status.st_size, path))
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files, key=lambda item: item[0]):
            if total <= self._max_bytes:
                break
            with contextlib.suppress(OSError):
                path.unlink()
            self._entries.pop(path.name, None)
            total -= size


def _stored(arrays: dict[str, mx.array], prefix: str) -> Any:
    parts: list[mx.array] = []
    while f"{prefix}.{len(parts)}" in arrays:
        parts.append(arrays[f"{prefix}.{len(parts)}"])
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 3:
        return tuple(parts)
    raise ValueError(f"{prefix} has {len(parts)} arrays")
