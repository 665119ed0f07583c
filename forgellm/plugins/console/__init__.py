"""The ``console`` plugin: a web page at ``/console`` with the server's state and a playground.

On by default (``--plugins no:console`` switches it off). The page and its assets hold no secret and
are served by the plugin itself (no CDN), under a strict Content-Security-Policy; with auth on, the
page asks for a key and keeps it in the tab's session storage. See docs/console.md.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from forgellm import Caller, Server, Usage, hookimpl
from forgellm.plugins.console.routes import STATE_KEY, console_router
from forgellm.plugins.console.stats import BUCKET_SECONDS, LiveStats

SAMPLER_KEY = "console.sampler"


@hookimpl
def register_routes(register: Callable[[Any], None], server: Server) -> None:
    server.plugin_state[STATE_KEY] = LiveStats()
    register(console_router())


async def _sample(server: Server) -> None:
    """The engine's gauges, a few times a bucket, so the charts show load between generations too."""
    while True:
        residents = server.registry.residents
        active = sum(resident.scheduler.active_count for resident in residents)
        queued = sum(resident.scheduler.waiting_count for resident in residents)
        server.plugin_state[STATE_KEY].sample(active, queued)
        await asyncio.sleep(BUCKET_SECONDS / 5)


@hookimpl
def startup(server: Server) -> None:
    server.plugin_state[SAMPLER_KEY] = asyncio.get_running_loop().create_task(_sample(server))


@hookimpl
async def shutdown(server: Server) -> None:
    task = server.plugin_state.pop(SAMPLER_KEY, None)
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@hookimpl
def after_generate(usage: Usage, caller: Caller, server: Server) -> None:
    server.plugin_state[STATE_KEY].generation(usage, caller.record.time_to_first_token_ms)
