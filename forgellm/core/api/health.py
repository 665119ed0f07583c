"""Health probes for orchestrators and load balancers; public even when auth is on."""

from __future__ import annotations

from typing import Literal

import msgspec
from litestar import HttpMethod, Response, route
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec

from forgellm.core.server import Server


class Liveness(msgspec.Struct):
    status: Literal["ok"]


class Readiness(msgspec.Struct, omit_defaults=True):
    """Whether to send traffic here; nothing more, since the probes answer without credentials."""

    ready: bool
    model_loaded: bool
    engine_alive: bool
    # Of a model sharded over processes: how many ranks, and whether they all answer (absent: one process).
    ranks: int | None = None
    ranks_answering: bool | None = None


# HEAD too: load balancers and uptime checkers often probe with it.
PROBE_METHODS = [HttpMethod.GET, HttpMethod.HEAD]


@route("/healthz", http_method=PROBE_METHODS, summary="The process is alive", tags=["operations"])
async def healthz() -> Liveness:
    return Liveness(status="ok")


@route(
    "/readyz",
    http_method=PROBE_METHODS,
    summary="A model is loaded and the engine thread is running",
    tags=["operations"],
    responses={
        503: ResponseSpec(
            Readiness,
            description="Not ready: no model loaded (yet), the engine thread died, or a sharded model lost a rank",
            generate_examples=False,
        ),
    },
)
async def readyz(server: NamedDependency[Server]) -> Response[Readiness]:
    default = server.default_model
    state, alive = default.slot.state, default.scheduler.alive
    ranks = server.backend.ranks()
    answering = server.backend.unavailable() is None
    ready = state.loaded and alive and answering
    body = Readiness(ready=ready, model_loaded=state.loaded, engine_alive=alive)
    if ranks:
        body.ranks, body.ranks_answering = len(ranks), answering
    return Response(body, status_code=200 if ready else 503)


ROUTES = [healthz, readyz]
# The probes' paths: their 503 means "not ready", not a refusal (the metrics plugin counts them apart).
PROBE_PATHS = frozenset(path for handler in ROUTES for path in handler.paths)
