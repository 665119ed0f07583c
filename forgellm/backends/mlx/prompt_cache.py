"""The prompt cache: finished sequences' KV caches, kept so that a prompt sharing a prefix with one (a system
prompt, a conversation's earlier turns) skips that prefix's prefill.

The memory tier is mlx-lm's ``LRUPromptCache`` (as mlx_lm.server keeps it). With --prompt-cache-dir, what
leaves it (pushed out by newer entries, or released to make room for running sequences) goes to the disk
tier, and so does what it holds when the engine closes (a restart, a model swap); a prompt takes its longest
cached prefix from whichever tier has the longer one.
"""

from __future__ import annotations

from typing import Any

from mlx_lm.models.cache import LRUPromptCache, PromptTrie, can_trim_prompt_cache, trim_prompt_cache

from forgellm import CacheStats
from forgellm.backends.mlx.disk_prompt_cache import DiskPromptCache

# An engine serves one model, so its prompt cache needs no per-model key.
_CACHE_KEY = "model"


class _LeavingTrie(PromptTrie):
    """mlx-lm's trie, noting what LRUPromptCache evicts: it removes entries through pop() only when evicting
    (a longer entry's prefixes, which it supersedes, go through pop_prefixes)."""

    def __init__(self) -> None:
        super().__init__()
        self.left: list[tuple[list[int], Any]] = []

    def pop(self, model: Any, tokens: list[int]) -> Any:
        value = super().pop(model, tokens)
        self.left.append((list(tokens), value))
        return value


class PromptCache:
    def __init__(self, max_entries: int, max_bytes: int, disk: DiskPromptCache | None) -> None:
        self._memory = LRUPromptCache(max_size=max_entries, max_bytes=max_bytes or 1 << 63)
        self._leaving = _LeavingTrie()
        self._memory._trie = self._leaving
        self._disk = disk
        self.lookups = self.memory_hits = self.disk_hits = 0

    def nearest(self, prompt: list[int]) -> tuple[list[Any] | None, list[int]]:
        """A cache sharing the longest prefix with prompt (a copy, or loaded from disk), and the tokens it does not
        cover; at least the prompt's last token is left, to give the first logits."""
        self.lookups += 1
        cache, rest = self._memory.fetch_nearest_cache(_CACHE_KEY, prompt)
        if cache is not None and not rest:
            if not can_trim_prompt_cache(cache):
                cache, rest = None, prompt
            else:
                trim_prompt_cache(cache, 1)
                rest = prompt[-1:]
        from_memory = len(prompt) - len(rest) if cache is not None else 0
        disk = self._disk
        if disk is not None and from_memory < len(prompt) - 1:  # else the disk could not cover more
            found = disk.longest_prefix(prompt)
            keep = min(found[1], len(prompt) - 1) if found is not None else 0
            if found is not None and keep > from_memory:
                loaded = disk.load(found[0], keep)
                if loaded is not None:
                    self.disk_hits += 1
                    return loaded, prompt[keep:]
        if cache is not None:
            self.memory_hits += 1
        return cache, rest

    def insert(self, tokens: list[int], cache: list[Any]) -> None:
        self._memory.insert_cache(_CACHE_KEY, tokens, cache)
        self._spill()

    def release(self, nbytes: int) -> None:
        self._memory.trim_to(n_bytes=self._memory.nbytes - nbytes)
        self._spill()

    def keep_newest(self, entries: int) -> None:
        """Drop the least recently used entries past the newest ``entries`` (as another rank's cache dropped them
        to its byte bound or to make room)."""
        if len(self._memory) > entries:
            self._memory.trim_to(n_sequences=entries)
            self._spill()

    def _spill(self) -> None:
        """What the memory tier let go of, to disk."""
        left, self._leaving.left = self._leaving.left, []
        if self._disk is not None:
            for tokens, entry in left:
                self._disk.store(tokens, entry.prompt_cache)

    def close(self) -> None:
        """Keep what the memory tier holds on disk (it survives the restart or the swap): it leaves memory as an
        eviction does, so _spill writes it."""
        if self._disk is not None:
            self._memory.trim_to(n_sequences=0)
            self._spill()

    @property
    def nbytes(self) -> int:
        return int(self._memory.nbytes)

    def stats(self, kv_bytes_per_token: int, kv_in_use: int) -> CacheStats:
        disk = self._disk
        return CacheStats(
            kv_bytes_per_token=kv_bytes_per_token,
            kv_in_use=kv_in_use,
            memory_bytes=self.nbytes,
            memory_entries=len(self._memory),
            disk_bytes=disk.nbytes if disk is not None else 0,
            disk_entries=len(disk) if disk is not None else 0,
            lookups=self.lookups,
            memory_hits=self.memory_hits,
            disk_hits=self.disk_hits,
        )
