"""The app factory: a Litestar app over the core routes, plugin routes and plugin hooks."""

from __future__ import annotations

from typing import Optional, Sequence

import pluggy
from litestar import Litestar, Router
from litestar.config.cors import CORSConfig
from litestar.datastructures import State
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Server as OpenAPIServer

from forgellm import __version__
from forgellm.core import guide_api, health, openai_api
from forgellm.core.access_control import STATUS, access_guard
from forgellm.core.cross_site import CrossSiteScreen, HostAllowList
from forgellm.core.errors import error_response
from forgellm.core.plugins import create_plugin_manager, enabled_plugin_names
from forgellm.core.request_context import RequestContextMiddleware
from forgellm.core.server import Server
from forgellm.core.settings import Settings, normalized_root_path


def cors_config(origins: Sequence[str]) -> Optional[CORSConfig]:
    """Browser access for the configured origins only; no origins, no CORS headers at all."""
    if not origins:
        return None
    return CORSConfig(
        allow_origins=list(origins),
        allow_methods=["GET", "POST", "OPTIONS"],
        allow_headers=["Authorization", "Content-Type", "X-API-Key", "X-Request-ID"],
        # Credentials travel in headers, never cookies, so the browser need not send cookies.
        allow_credentials=False,
        expose_headers=[
            "X-Request-ID",
            "Retry-After",
            "RateLimit-Limit",
            "RateLimit-Remaining",
            "RateLimit-Reset",
            "RateLimit-Policy",
        ],
    )


def create_app(settings: Settings, pm: Optional[pluggy.PluginManager] = None) -> Litestar:
    """Build the server for these settings; pm defaults to the plugins ``settings.plugins`` enables."""
    if pm is None:
        pm = create_plugin_manager(enabled_plugin_names(settings.plugins))
    server = Server(settings, pm)
    handlers = [*guide_api.ROUTES, *openai_api.ROUTES, *health.ROUTES]
    pm.hook.register_routes(register=handlers.append, server=server)
    app = Litestar(
        route_handlers=handlers,
        guards=[access_guard],
        exception_handlers={Exception: error_response},
        on_startup=[server.startup],
        on_shutdown=[server.shutdown],
        request_max_body_size=settings.max_body_size,
        # The schema and its viewers need the same credentials as status (any authenticated client).
        openapi_config=OpenAPIConfig(
            title="ForgeLLM",
            version=__version__,
            path="/docs",
            openapi_router=Router("/docs", route_handlers=[], opt={"action": STATUS}, include_in_schema=False),
            # Behind a proxy under --root-path, the schema's clients must call the API there.
            servers=[OpenAPIServer(url=normalized_root_path(settings.root_path) or "/")],
        ),
        cors_config=cors_config(settings.cors_origin),
        state=State({"server": server}),
        logging_config=None,
    )
    # Wrap the whole handler, not one route, so 404s and 405s get a request id and an access-log line.
    screen = CrossSiteScreen(app.asgi_handler, HostAllowList(settings.allowed_hosts, settings.host), settings.cors_origin)
    app.asgi_handler = RequestContextMiddleware(screen, server)
    server.app = app
    return app
