"""What route handlers receive through Litestar's dependency injection: the server, its generation
service, and the caller of a generation route."""

from __future__ import annotations

from typing import Any

from litestar import Request
from litestar.di import NamedDependency, Provide

from forgellm.core.api.request import Caller
from forgellm.core.clients import connection_client_key
from forgellm.core.http.guard import identity_of
from forgellm.core.http.request_context import record_of
from forgellm.core.server import Server


async def client_disconnects(request: Request[Any, Any, Any]) -> None:
    """Complete when the client goes away (its request body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def provide_caller(request: Request[Any, Any, Any], server: NamedDependency[Server]) -> Caller:
    identity = identity_of(request)
    return Caller(
        identity=identity,
        client_key=connection_client_key(request, identity, server.config.ipv6_client_prefix),
        record=record_of(request),
        disconnected=lambda: client_disconnects(request),
        request=request,
    )


def dependencies(server: Server) -> dict[str, Provide]:
    return {
        "server": Provide(lambda: server, use_cache=True, sync_to_thread=False),
        "generations": Provide(lambda: server.generations, use_cache=True, sync_to_thread=False),
        "caller": Provide(provide_caller, sync_to_thread=False),
    }
