"""Health probes for orchestrators and load balancers; public even when auth is on."""

from __future__ import annotations

from litestar import Request, Response, get


@get("/healthz", summary="The process is alive", include_in_schema=True)
async def healthz() -> dict:
    return {"status": "ok"}


@get("/readyz", summary="A model is loaded and the engine thread is running")
async def readyz(request: Request) -> Response:
    server = request.app.state.server
    state = server.models.state
    ready = state.loaded and server.scheduler.alive
    body = {
        "ready": ready,
        "model_loaded": state.loaded,
        "engine_alive": server.scheduler.alive,
        "model_name": state.model_name,
    }
    return Response(body, status_code=200 if ready else 503)


ROUTES = [healthz, readyz]
