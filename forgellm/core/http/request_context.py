"""Per-request bookkeeping: the request id, who asked, what it cost, and the access-log hook at the end.

It wraps Litestar's whole ASGI handler (not a route middleware) so that 404s and
405s are recorded too.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from forgellm.core.server import Server

REQUEST_ID_HEADER = b"x-request-id"
_RECORD_KEY = "forgellm.record"
# A client's request id is echoed back and logged, so only short, plain ones are accepted.
_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


@dataclass
class RequestRecord:
    """What the access log says about one request; route code fills in identity and usage."""

    request_id: str
    method: str
    path: str
    client: Optional[str]
    # The matched route's path template ("/api/model/status"); None when no route matched (404).
    route: Optional[str] = None
    started: float = field(default_factory=time.perf_counter)
    identity: Any = None
    status: Optional[int] = None
    prompt_tokens: Optional[int] = None
    completion_tokens: Optional[int] = None
    time_to_first_token_ms: Optional[float] = None
    latency_ms: Optional[float] = None

    @property
    def subject(self) -> Optional[str]:
        return getattr(self.identity, "subject", None)


def record_of(connection) -> RequestRecord:
    """The record of the request a Litestar Request (or scope) belongs to."""
    scope = connection if isinstance(connection, dict) else connection.scope
    return scope["state"][_RECORD_KEY]


def _request_id(scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == REQUEST_ID_HEADER:
            text = value.decode("latin-1")
            if _SAFE_REQUEST_ID.match(text):
                return text
    return uuid.uuid4().hex


class RequestContextMiddleware:
    def __init__(self, app, server: "Server") -> None:
        self._app = app
        self._server = server

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        client = scope.get("client")
        record = RequestRecord(
            request_id=_request_id(scope),
            method=scope["method"],
            path=scope["path"],
            client=client[0] if client else None,
        )
        scope.setdefault("state", {})[_RECORD_KEY] = record

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != REQUEST_ID_HEADER]
                headers.append((REQUEST_ID_HEADER, record.request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self._app(scope, receive, send_with_id)
        finally:
            record.latency_ms = (time.perf_counter() - record.started) * 1000
            record.route = scope.get("path_template")  # Litestar's router sets it on the shared scope
            if record.status is None:
                record.status = 499  # the client left before a response started
            self._server.hook.access_log(entry=record, server=self._server)
