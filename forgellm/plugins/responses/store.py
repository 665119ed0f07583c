"""Recent responses, kept so that a client can continue a conversation with ``previous_response_id``.

Bounded (``--responses-store-size`` responses in all; the least recently used goes first) and owned:
a response is found only by the client that created it (its identity, or its address when no auth
plugin is on), so an identity never reads another's. It lives in the server's memory and is lost on
restart, as documented.
"""

from __future__ import annotations

from collections import OrderedDict
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
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()

    def put(self, entry: StoredResponse) -> None:
        if self._capacity <= 0:
            return
        self._entries[entry.response.id] = entry
        self._entries.move_to_end(entry.response.id)
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)

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
        del self._entries[response_id]
        return True

    def __len__(self) -> int:
        return len(self._entries)
