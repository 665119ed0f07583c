"""Authentication and authorization, decided by plugins: one guard asks the hooks for every protected route.

A route declares the action it needs in its ``opt`` (``opt={"action": "generate"}``);
routes without an action (health probes) are public.
"""

from __future__ import annotations

from typing import Any

from litestar.connection import ASGIConnection
from litestar.handlers import BaseRouteHandler

from forgellm.core.errors import Forbidden
from forgellm.core.http.cross_site import check_anonymous_write
from forgellm.core.http.request_context import record_of
from forgellm.core.identity import Identity
from forgellm.core.plugin_manager import await_me_maybe


def identity_of(connection: ASGIConnection[Any, Any, Any, Any]) -> Identity | None:
    return record_of(connection).identity


async def access_guard(connection: ASGIConnection[Any, Any, Any, Any], route_handler: BaseRouteHandler) -> None:
    action = route_handler.opt.get("action")
    if action is None:
        return
    server = connection.app.state.server
    identity = await await_me_maybe(server.hook.authenticate(request=connection, server=server))
    record_of(connection).identity = identity
    if identity is None:
        headers = connection.headers
        check_anonymous_write(
            str(connection.scope.get("method", "GET")),
            headers.get("host"),
            headers.get("origin"),
            headers.get("content-type"),
            has_body=headers.get("content-length", "0") != "0" or "transfer-encoding" in headers,
            cors_origins=server.config.cors_origin,
        )
    if not await server.allows(identity, action, connection):
        raise Forbidden(f"Not allowed to {action}")
