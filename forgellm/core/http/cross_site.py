"""What stops a web page from driving a server on the visitor's machine or network.

A page can send requests to ``http://localhost:5001`` from the visitor's browser. Without
authentication (the default), that would let any site load, unload and generate:

- **DNS rebinding**: the page's own host name is made to resolve to 127.0.0.1, so its requests
  are same-origin and the page reads the answers. They carry the page's host name in ``Host``,
  so requests whose ``Host`` is not an allowed name are refused (``--allowed-hosts``; by default
  the localhost names and the name the server is bound to). An IP address as ``Host`` is always
  allowed: a rebinding attack needs a name of its own.
- **Cross-site requests**: a form or ``fetch(..., {mode: "no-cors"})`` can POST without a CORS
  preflight, as ``text/plain`` or with no body at all. A browser marks such a request with an
  ``Origin`` header, so an anonymous state-changing request is refused when its ``Origin`` is
  neither the server's own nor a ``--cors-origin``, or when its body is not ``application/json``.

With an auth plugin on, a page cannot attach the credentials (they travel in headers, never in
cookies), so the Origin and body checks apply to anonymous requests only; the Host check
applies to every request.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from fnmatch import fnmatchcase
from urllib.parse import urlsplit

import msgspec

from forgellm.core.errors import ApiError
from forgellm.core.http.asgi import ASGIApp, Receive, Scope, Send, header
from forgellm.core.http.errors import ErrorShapes

LOCALHOST_NAMES = ("localhost", "*.localhost", "localhost.localdomain")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _host_name(host: str) -> str:
    """The name in a Host header, without port or IPv6 brackets, lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _is_ip_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class HostAllowList:
    """The host names requests may name in ``Host`` (fnmatch patterns; ``*`` allows every name)."""

    def __init__(self, configured: Iterable[str], bound_host: str | None) -> None:
        patterns = [p.strip().lower() for p in configured if p.strip()]
        if not patterns:
            patterns = [*LOCALHOST_NAMES, *([bound_host.lower()] if bound_host else [])]
        self.patterns = tuple(patterns)

    def allows(self, host: str | None) -> bool:
        if host is None:
            return False
        name = _host_name(host)
        return _is_ip_address(name) or any(fnmatchcase(name, pattern) for pattern in self.patterns)


def check_host(host: str | None, allowed: HostAllowList) -> None:
    if not allowed.allows(host):
        raise ApiError(
            400, "Invalid Host header: this server does not answer to that name (--allowed-hosts)", code="invalid_host"
        )


def check_anonymous_write(
    method: str,
    host: str | None,
    origin: str | None,
    content_type: str | None,
    has_body: bool,
    cors_origins: Iterable[str],
) -> None:
    """Refuse an unauthenticated state-changing request that a web page could have sent (403 or 415)."""
    if method in SAFE_METHODS:
        return
    if origin is not None and origin not in cors_origins and not _same_origin(origin, host):
        raise ApiError(
            403, "Cross-origin requests are refused; list the origin with --cors-origin", code="cross_origin"
        )
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    if has_body and media_type != "application/json":
        raise ApiError(
            415,
            "Send the request body as application/json (Content-Type: application/json)",
            code="unsupported_media_type",
        )


def _same_origin(origin: str, host: str | None) -> bool:
    return host is not None and urlsplit(origin).netloc.lower() == host.strip().lower()


class CrossSiteScreen:
    """ASGI wrapper, before routing: the Host check, and OPTIONS answered 405 unless it is a CORS preflight
    from an allowed origin (so OPTIONS, like GET, tells nothing of which paths exist)."""

    def __init__(
        self, app: ASGIApp, allowed_hosts: HostAllowList, cors_origins: Iterable[str], error_shapes: ErrorShapes
    ) -> None:
        self._app = app
        self._allowed_hosts = allowed_hosts
        self._cors_origins = frozenset(cors_origins)
        self._error_shapes = error_shapes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            error = self._refusal(scope)
            if error is not None:
                await self._send(scope, send, error)
                return
        await self._app(scope, receive, send)

    def _refusal(self, scope: Scope) -> ApiError | None:
        try:
            check_host(header(scope, b"host"), self._allowed_hosts)
        except ApiError as error:
            return error
        if scope["method"] == "OPTIONS" and not self._allowed_preflight(scope):
            return ApiError(405, "Method not allowed", headers={"Allow": "GET, HEAD, POST"})
        return None

    def _allowed_preflight(self, scope: Scope) -> bool:
        origin = header(scope, b"origin")
        return origin in self._cors_origins and header(scope, b"access-control-request-method") is not None

    async def _send(self, scope: Scope, send: Send, error: ApiError) -> None:
        shape = self._error_shapes.for_path(scope["path"], scope.get("root_path", ""))
        body = msgspec.json.encode(shape(error))
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
        await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
        await send({"type": "http.response.body", "body": body})
