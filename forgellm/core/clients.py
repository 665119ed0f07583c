"""Who a request counts against, and how many generations each client may have in flight.

A client is the authenticated subject when an auth plugin identified one, else the network
address it came from (the real one behind a proxy listed in --trusted-proxies). An anonymous
IPv6 client is its network prefix (``--ipv6-client-prefix``, a /64 by default): a host is handed
a whole /64, so counting full addresses would give one machine 2^64 budgets.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from typing import Any

from forgellm.core.errors import ApiError
from forgellm.core.identity import Identity


def client_key(identity: Identity | None, host: str | None, ipv6_prefix: int = 64) -> str:
    """The key a request's limits count under: ``subject:NAME`` or ``address:ADDRESS[/PREFIX]``."""
    if identity is not None:
        return "subject:" + identity.subject
    if not host:
        return "address:unknown"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return "address:" + host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:  # ::ffff:a.b.c.d, a dual-stack socket's IPv4 client
            return f"address:{address.ipv4_mapped}"
        if ipv6_prefix < 128:
            return f"address:{ipaddress.ip_network(f'{address}/{ipv6_prefix}', strict=False)}"
    return f"address:{address}"


def connection_client_key(connection: Any, identity: Identity | None, ipv6_prefix: int) -> str:
    """client_key for a Litestar request or connection, from the address it came from."""
    client = connection.client
    return client_key(identity, client.host if client else None, ipv6_prefix)


class InFlightLimit:
    """Generations a client may have admitted and not yet finished (--max-inflight-per-client), so that one
    client cannot take every batch slot and queue place; the next one is a 429 until one ends."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._counts: Counter[str] = Counter()

    def acquire(self, key: str) -> None:
        if self.limit and self._counts[key] >= self.limit:
            raise ApiError(
                429,
                f"Too many generations in flight for this client: the limit is {self.limit}; retry when one ends",
                headers={"Retry-After": "1"},
                code="too_many_in_flight",
            )
        self._counts[key] += 1

    def release(self, key: str) -> None:
        self._counts[key] -= 1
        if self._counts[key] <= 0:
            del self._counts[key]

    def count(self, key: str) -> int:
        return self._counts[key]
