"""The console's routes: the page and its assets (public, holding no secret) and the state it polls.

Every console response carries a strict Content-Security-Policy: scripts, styles and connections
from this origin only, no inline script, no framing.
"""

from __future__ import annotations

import dataclasses
from importlib import resources
from typing import Any

from litestar import Request, Response, Router, get
from litestar.di import NamedDependency
from litestar.exceptions import NotFoundException
from litestar.params import FromPath
from litestar.response import Redirect

from forgellm import ADMIN, LOAD, STATUS, Server, available_plugins, guide_errors, record_of, resident_model

STATE_KEY = "console"
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
ASSETS = {"console.js": "text/javascript", "console.css": "text/css"}


def _static(name: str) -> bytes:
    return resources.files(__package__).joinpath("static", name).read_bytes()


@get("/console", include_in_schema=False)
async def page(request: Request[Any, Any, Any]) -> Response[bytes] | Redirect:
    if request.scope["path"].endswith("/"):  # the page's relative asset links need /console, not /console/
        return Redirect(path=f"{request.scope.get('root_path', '')}/console")
    return Response(_static("index.html"), media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)


@get("/console/assets/{name:str}", include_in_schema=False)
async def asset(name: FromPath[str]) -> Response[bytes]:
    if name not in ASSETS:
        raise NotFoundException()
    return Response(_static(name), media_type=f"{ASSETS[name]}; charset=utf-8", headers=SECURITY_HEADERS)


@get("/", include_in_schema=False)
async def home(request: Request[Any, Any, Any]) -> Redirect:
    return Redirect(path=f"{request.scope.get('root_path', '')}/console")


@get(
    "/console/api/state",
    opt={"action": STATUS},
    summary="What the console shows: models, engine, live series, plugins and configuration",
    tags=["console"],
    responses=guide_errors(401, 403),
)
async def state(request: Request[Any, Any, Any], server: NamedDependency[Server]) -> dict[str, Any]:
    registry = server.registry
    identity = record_of(request).identity
    available = available_plugins()
    enabled = {name for name, _ in server.pm.list_name_plugin()}
    return {
        "models": [resident_model(resident, registry) for resident in registry.residents],
        "memory_in_use": registry.memory_in_use(),
        "memory_budget": registry.memory_budget,
        "ranks": [dataclasses.asdict(rank) for rank in server.backend.ranks()],
        "ranks_error": server.backend.unavailable(),
        "series": server.plugin_state[STATE_KEY].series(),
        "plugins": [
            {"name": name, "version": info.version, "enabled": name in enabled}
            for name, info in sorted(available.items())
        ],
        # The settings name files and allowed paths: for administrators only, secrets masked even then.
        "config": server.settings.masked() if await server.allows(identity, ADMIN, request) else None,
        "can_load": await server.allows(identity, LOAD, request),
    }


def console_router() -> Router:
    return Router("/", route_handlers=[page, asset, home, state])
