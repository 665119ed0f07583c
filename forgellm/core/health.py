"""Health probes for orchestrators and load balancers; public even when auth is on."""

from __future__ import annotations

from typing import Literal, Optional

import msgspec
from litestar import Request, Response, get
from litestar.openapi.datastructures import ResponseSpec


class Liveness(msgspec.Struct):
    status: Literal["ok"]


class Readiness(msgspec.Struct):
    ready: bool
    model_loaded: bool
    engine_alive: bool
    model_name: Optional[str]


@get("/healthz", summary="The process is alive", tags=["operations"])
async def healthz() -> Liveness:
    return Liveness(status="ok")


@get(
    "/readyz",
    summary="A model is loaded and the engine thread is running",
    tags=["operations"],
    responses={
        503: ResponseSpec(Readiness, description="Not ready: no model loaded (yet), or the engine thread died",
                          generate_examples=False),
    },
)
async def readyz(request: Request) -> Response[Readiness]:
    server = request.app.state.server
    state = server.models.state
    alive = server.scheduler.alive
    ready = state.loaded and alive
    body = Readiness(ready=ready, model_loaded=state.loaded, engine_alive=alive, model_name=state.model_name)
    return Response(body, status_code=200 if ready else 503)


ROUTES = [healthz, readyz]
