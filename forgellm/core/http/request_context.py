"""Per-request bookkeeping: the request id, who asked, what it cost, and the access-log hook at the end.

It wraps Litestar's whole ASGI handler (not a route middleware) so that 404s and
405s are recorded too.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from forgellm.core.http.asgi import ASGIApp, Message, Receive, Scope, Send, header
from forgellm.core.identity import Identity

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
    client: str | None
    # The matched route's path template ("/api/model/status"); None when no route matched (404).
    route: str | None = None
    started: float = field(default_factory=time.perf_counter)
    identity: Identity | None = None
    model: str | None = None  # the resident model a generation ran on, by the name requests use
    status: int | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    accepted_draft_tokens: int | None = None  # generated tokens speculative decoding drafted and the model kept
    time_to_first_token_ms: float | None = None
    latency_ms: float | None = None

    @property
    def subject(self) -> str | None:
        return self.identity.subject if self.identity is not None else None


def record_of(connection: Any) -> RequestRecord:
    """The record of the request a Litestar Request (or scope) belongs to."""
    scope = connection if isinstance(connection, dict) else connection.scope
    record: RequestRecord = scope["state"][_RECORD_KEY]
    return record


def _request_id(scope: Scope) -> str:
    text = header(scope, REQUEST_ID_HEADER)
    return text if text is not None and _SAFE_REQUEST_ID.match(text) else uuid.uuid4().hex


class RequestContextMiddleware:
    """Gives every request its record (and id) and hands the finished record to on_finished: the access log."""

    def __init__(self, app: ASGIApp, on_finished: Callable[[RequestRecord], object]) -> None:
        self._app = app
        self._on_finished = on_finished

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
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

        async def send_with_id(message: Message) -> None:
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
            self._on_finished(record)
