"""Recent responses, kept so that a client can continue a conversation with ``previous_response_id``.

Bounded (``--responses-store-size`` responses in all) and owned. When it is full, the least recently
used response of the client holding the most goes first, so one client's many requests evict its own
responses, never another's. A response is found only by the client that created it (its identity,
or its address when no auth plugin is on), so an identity never reads another's. It lives in the
server's memory and is lost on restart, as documented.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any

from forgellm.plugins.responses.protocol import ResponseObject


@dataclass(frozen=True)
class StoredResponse:
    owner: str
    response: ResponseObject
    # The whole conversation as chat-template messages: the inputs that led to the response, then its output.
    conversation: list[dict[str, Any]]


class ResponseStore:
    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()  # least recently used first
        self._held: Counter[str] = Counter()  # entries per owner

    def put(self, entry: StoredResponse) -> None:
        if self._capacity <= 0:
            return
        if entry.response.id not in self._entries:
            self._held[entry.owner] += 1
        self._entries[entry.response.id] = entry
        self._entries.move_to_end(entry.response.id)
        while len(self._entries) > self._capacity:
            self._evict()

    def _evict(self) -> None:
        """The least recently used response of the owner holding the most."""
        owner = max(self._held, key=self._held.__getitem__)
        victim = next(key for key, stored in self._entries.items() if stored.owner == owner)
        self._remove(victim)

    def _remove(self, response_id: str) -> None:
        owner = self._entries.pop(response_id).owner
        self._held[owner] -= 1
        if self._held[owner] <= 0:
            del self._held[owner]

    def get(self, response_id: str, owner: str) -> StoredResponse | None:
        """The response, if it is still stored and this owner created it."""
        entry = self._entries.get(response_id)
        if entry is None or entry.owner != owner:
            return None
        self._entries.move_to_end(response_id)
        return entry

    def delete(self, response_id: str, owner: str) -> bool:
        if self.get(response_id, owner) is None:
            return False
        self._remove(response_id)
        return True

    def __len__(self) -> int:
        return len(self._entries)
