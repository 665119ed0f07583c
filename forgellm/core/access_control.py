"""Authentication and authorization, decided by plugins: one guard asks the hooks for every protected route.

A route declares the action it needs in its ``opt`` (``opt={"action": "generate"}``);
routes without an action (health probes) are public.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from litestar.connection import ASGIConnection
from litestar.handlers import BaseRouteHandler

from forgellm.core.cross_site import check_anonymous_write
from forgellm.core.errors import Forbidden
from forgellm.core.plugins import await_me_maybe
from forgellm.core.request_context import record_of

STATUS = "status"  # read-only model information: any authenticated client
GENERATE = "generate"
LOAD = "load"
ADMIN = "admin"
ACTIONS = (STATUS, GENERATE, LOAD, ADMIN)


@dataclass(frozen=True)
class Identity:
    """Who made a request, as an authentication plugin established it."""

    subject: str
    scopes: frozenset[str] = frozenset()
    method: str = "unknown"  # "api_key", "jwt", ...
    claims: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


def identity_of(connection: ASGIConnection) -> Optional[Identity]:
    return record_of(connection).identity


async def access_guard(connection: ASGIConnection, route_handler: BaseRouteHandler) -> None:
    action = route_handler.opt.get("action")
    if action is None:
        return
    server = connection.app.state.server
    identity = await await_me_maybe(server.hook.authenticate(request=connection, server=server))
    record_of(connection).identity = identity
    if identity is None:
        headers = connection.headers
        check_anonymous_write(
            connection.scope["method"], headers.get("host"), headers.get("origin"), headers.get("content-type"),
            has_body=headers.get("content-length", "0") != "0" or "transfer-encoding" in headers,
            cors_origins=server.settings.cors_origin,
        )
    for verdict in server.hook.authorize(identity=identity, action=action, request=connection, server=server):
        if await await_me_maybe(verdict) is False:
            raise Forbidden(f"Not allowed to {action}")
