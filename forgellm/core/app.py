"""The app factory: a Litestar app over the core routes, plugin routes and plugin hooks.

It sits above ``http/`` (the middleware, guards and error shapes every route shares) and ``api/`` (the
routes), and is the one place that imports both."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import pluggy
from litestar import Litestar, Router
from litestar.config.cors import CORSConfig
from litestar.datastructures import State
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Server as OpenAPIServer

from forgellm.core.api import health
from forgellm.core.api.guide.protocol import error_body as guide_error_body
from forgellm.core.api.guide.routes import guide_router
from forgellm.core.api.models.routes import ROUTES as MODELS_ROUTES
from forgellm.core.api.openai.protocol import PREFIX as OPENAI_PREFIX
from forgellm.core.api.openai.protocol import error_body as openai_error_body
from forgellm.core.api.openai.routes import openai_router
from forgellm.core.config.settings import Settings, normalized_root_path
from forgellm.core.dependencies import dependencies
from forgellm.core.http.asgi import ASGIApp
from forgellm.core.http.cross_site import CrossSiteScreen, HostAllowList
from forgellm.core.http.errors import ErrorShapes
from forgellm.core.http.guard import access_guard
from forgellm.core.http.request_context import RequestContextMiddleware, RequestRecord
from forgellm.core.identity import STATUS
from forgellm.core.plugin_manager import create_plugin_manager, enabled_plugin_names
from forgellm.core.server import Server
from forgellm.version import __version__

# Headers every browser client may send and read; plugins add theirs (register_cors_headers).
CORS_REQUEST_HEADERS = ("Content-Type", "X-Request-ID")
CORS_RESPONSE_HEADERS = ("X-Request-ID", "Retry-After")


def cors_config(origins: Sequence[str], pm: pluggy.PluginManager) -> CORSConfig | None:
    """Browser access for the configured origins only; no origins, no CORS headers at all."""
    if not origins:
        return None
    allowed, exposed = list(CORS_REQUEST_HEADERS), list(CORS_RESPONSE_HEADERS)
    pm.hook.register_cors_headers(allow=allowed.append, expose=exposed.append)
    return CORSConfig(
        allow_origins=list(origins),
        allow_methods=["GET", "POST", "OPTIONS"],
        allow_headers=allowed,
        # Credentials travel in headers, never cookies, so the browser need not send cookies.
        allow_credentials=False,
        expose_headers=exposed,
    )


def create_app(settings: Settings, pm: pluggy.PluginManager | None = None) -> Litestar:
    """Build the server for these settings; pm defaults to the plugins ``settings.plugins`` enables."""
    if pm is None:
        pm = create_plugin_manager(enabled_plugin_names(settings["plugins"]))
    server = Server(settings, pm)
    config = server.config
    handlers: list[Any] = [guide_router(), *MODELS_ROUTES, openai_router(), *health.ROUTES]
    pm.hook.register_routes(register=handlers.append, server=server)
    # Answers to requests that matched no route, or were refused before routing, take their API's shape.
    error_shapes = ErrorShapes(default=guide_error_body)
    error_shapes.register(OPENAI_PREFIX, openai_error_body)
    pm.hook.register_error_shapes(register=error_shapes.register)
    app = Litestar(
        route_handlers=handlers,
        guards=[access_guard],
        dependencies=dependencies(server),
        exception_handlers={Exception: error_shapes.handler()},
        on_startup=[server.startup],
        on_shutdown=[server.shutdown],
        request_max_body_size=config.max_body_size,
        # The schema and its viewers need the same credentials as status (any authenticated client).
        openapi_config=OpenAPIConfig(
            title="ForgeLLM",
            version=__version__,
            path="/docs",
            openapi_router=Router("/docs", route_handlers=[], opt={"action": STATUS}, include_in_schema=False),
            # Behind a proxy under --root-path, the schema's clients must call the API there.
            servers=[OpenAPIServer(url=normalized_root_path(config.root_path) or "/")],
        ),
        cors_config=cors_config(config.cors_origin, pm),
        state=State({"server": server}),
        logging_config=None,
    )
    # Wrap the whole handler, not one route, so 404s and 405s get a request id and an access-log line.
    hosts = HostAllowList(config.allowed_hosts, config.host)
    screen = CrossSiteScreen(cast(ASGIApp, app.asgi_handler), hosts, config.cors_origin, error_shapes)

    def access_log(record: RequestRecord) -> None:
        server.hook.access_log(entry=record, server=server)

    app.asgi_handler = cast(Any, RequestContextMiddleware(screen, access_log))
    server.app = app
    return app
