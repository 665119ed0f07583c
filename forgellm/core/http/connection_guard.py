"""Connection limits uvicorn does not have: a header-read deadline, a header size limit, a connection cap.

uvicorn arms its keep-alive timeout only after a first response and parses headers with no size
limit (httptools, in time quadratic in their size, on the event loop). So a client that connects
and sends nothing, or sends a header slowly (slowloris), holds a socket forever, and one huge
header stalls every other request. This subclass of uvicorn's httptools protocol adds what nginx
and Go's net/http have:

- a header deadline (``--header-timeout``): from the moment a connection opens, or the first byte
  of a request on a kept-alive one, the request line and headers must arrive whole within it, else
  408 and the connection closes;
- a header size limit (``--max-header-size``): more bytes before the end of the headers is a 431,
  and the bytes past the limit are never parsed;
- a body deadline (``--body-timeout``): from the end of a request's headers its body must arrive whole
  within it, else 408 and the connection closes, so slow bodies cannot hold the connection cap either;
- a connection cap (``--max-connections``): a new connection over the cap closes the connection
  that has waited longest for its request headers (idle or slow), as nginx reuses idle keep-alive
  connections; when every connection is busy with a request, the new one is closed at once.

Granian (hyper) has the first two natively; we keep uvicorn because the rest of the server (TLS,
trusted proxy headers, the graceful drain, signals) is built and tested on it, and the hooks used
here (``on_message_begin``, ``on_headers_complete``, ``on_response_complete``) are the parser
callbacks uvicorn's own protocol is made of.
"""

from __future__ import annotations

import asyncio
import json
import resource
import time
from dataclasses import dataclass
from typing import ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

HEADER_END = b"\r\n\r\n"
# What an unlimited hard limit is raised to: Linux's default fs.nr_open.
UNLIMITED_OPEN_FILES = 1 << 20


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout: float  # seconds; 0: none
    max_header_bytes: int
    max_connections: int
    body_timeout: float = 0  # seconds; 0: none


def _plain_response(status: int, reason: str, message: str, retry_after: int | None = None) -> bytes:
    """A whole HTTP/1.1 response in the guide's error envelope, for answers given before any route is known."""
    body = json.dumps({"success": False, "error": message}).encode()
    headers = [
        f"HTTP/1.1 {status} {reason}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
    ]
    if retry_after is not None:
        headers.append(f"retry-after: {retry_after}")
    return ("\r\n".join(headers) + "\r\n\r\n").encode() + body


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header deadline, a header size limit and a connection cap."""

    limits: ClassVar[ConnectionLimits]
    _header_bytes: int
    _header_tail: bytes
    _header_timer: asyncio.TimerHandle | None
    _body_timer: asyncio.TimerHandle | None
    _awaiting_headers_since: float | None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_bytes = 0
        self._header_tail = b""
        self._header_timer = None
        self._body_timer = None
        self._awaiting_headers_since = None
        self._await_headers()
        if len(self.connections) > self.limits.max_connections and not self._evict_idle_connection():
            # Nothing read yet, so no answer is possible: the client sees the connection close at once.
            self._refuse(b"")

    # -- awaiting a request's headers --------------------------------------------------------
    def _await_headers(self) -> None:
        self._header_bytes = 0
        self._header_tail = b""
        self._awaiting_headers_since = time.monotonic()
        if self.limits.header_timeout > 0 and self._header_timer is None:
            self._header_timer = self.loop.call_later(self.limits.header_timeout, self._header_timed_out)

    def _headers_arrived(self) -> None:
        self._awaiting_headers_since = None
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self._awaiting_headers_since is not None and not self.transport.is_closing():
            self._refuse(_plain_response(408, "Request Timeout", "The request headers did not arrive in time"))

    def _evict_idle_connection(self) -> bool:
        """Close the connection that has waited longest for request headers; False when none waits."""
        waiting = {
            c: c._awaiting_headers_since
            for c in self.connections
            if isinstance(c, GuardedHttpToolsProtocol)
            and c is not self
            and c._awaiting_headers_since is not None
            and not c.transport.is_closing()
        }
        if not waiting:
            return False
        oldest = min(waiting, key=waiting.__getitem__)
        oldest._refuse(_plain_response(503, "Service Unavailable", "Connection closed to make room", 1))
        return True

    def _refuse(self, response: bytes) -> None:
        """Close the connection, answering only a request that has begun: a client reads an answer written
        to an idle kept-alive connection as the answer to its next request."""
        self._headers_arrived()
        if self._header_bytes:
            self.transport.write(response)
        self.transport.close()

    # -- uvicorn's protocol ------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self._awaiting_headers_since is not None and not self._headers_fit(data):
            self._refuse(
                _plain_response(
                    431,
                    "Request Header Fields Too Large",
                    f"Request headers are larger than {self.limits.max_header_bytes} bytes",
                )
            )
            return
        super().data_received(data)

    def _headers_fit(self, data: bytes) -> bool:
        """Whether the headers, so far, end within the limit (bytes after their end are the body's)."""
        if self._header_timer is None and self.limits.header_timeout > 0:
            self._await_headers()  # the first bytes of a request on a kept-alive connection
        seen = self._header_tail + data
        end = seen.find(HEADER_END)
        if end >= 0:
            used = self._header_bytes - len(self._header_tail) + end + len(HEADER_END)
        else:
            used = self._header_bytes + len(data)
            self._header_tail = seen[-(len(HEADER_END) - 1) :]
        self._header_bytes = used
        return used <= self.limits.max_header_bytes

    def on_headers_complete(self) -> None:
        self._headers_arrived()
        if self.limits.body_timeout > 0:
            # Cancelled by on_message_complete, at once for a request without a body.
            self._body_timer = self.loop.call_later(self.limits.body_timeout, self._body_timed_out)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._body_arrived()
        super().on_message_complete()

    def _body_arrived(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _body_timed_out(self) -> None:
        self._body_timer = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is None or not cycle.response_started:
            # The handler still waits for the body: it will see the client gone once the connection closes.
            self.transport.write(_plain_response(408, "Request Timeout", "The request body did not arrive in time"))
        self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._await_headers_idle()

    def _await_headers_idle(self) -> None:
        # Between requests uvicorn's keep-alive timeout closes an idle connection; the header deadline
        # starts with the next request's first byte. Meanwhile the connection may be evicted.
        self._header_bytes = 0
        self._header_tail = b""
        self._awaiting_headers_since = time.monotonic()

    def connection_lost(self, exc: Exception | None) -> None:
        self._headers_arrived()
        self._body_arrived()
        super().connection_lost(exc)


def guarded_protocol(limits: ConnectionLimits) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol class with these limits (pass it as uvicorn's ``http``)."""
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,), {"limits": limits})


def raise_open_file_limit() -> int:
    """Raise the soft open-file limit to the hard one where allowed (every connection is a file descriptor,
    and some systems start processes at 1024); return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, UNLIMITED_OPEN_FILES)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft
