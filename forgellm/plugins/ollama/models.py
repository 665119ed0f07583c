"""``/api/tags``, ``/api/ps``, ``/api/show``, ``/api/version`` and ``/api/pull``: what Ollama's clients ask about
models, answered from the registry of resident models and the backend's built-in names.

Ollama lists the models on its disk; this server lists the models it holds, and the built-in names it
would load on demand (when --allow-model lets clients load them). A digest identifies a served name and
its source; it is no content hash of an Ollama manifest.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import time
from collections.abc import AsyncIterator, Callable

from litestar.response import Stream

from forgellm import ApiError, EmbeddingModel, LoadedModel, Server, streamed
from forgellm.plugins.ollama.generation import served_name
from forgellm.plugins.ollama.protocol import (
    NDJSON,
    OLLAMA_API_VERSION,
    ListedModel,
    ModelDetails,
    ModelList,
    PullStatus,
    ShowResponse,
    Version,
    error_lines,
    ndjson_line,
)

# /api/ps's expires_at for a model that stays until the operator unloads it (Ollama's "forever" is far off too).
_FOREVER = "9999-12-31T23:59:59Z"


def _time_text(timestamp: float) -> str:
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
    return moment.isoformat().replace("+00:00", "Z")


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _capabilities(model: LoadedModel) -> list[str]:
    if isinstance(model, EmbeddingModel):
        return ["embedding"]
    capabilities = ["completion"]
    if model.has_chat_template:
        capabilities.append("tools")  # described in the prompt when the template does not render tools itself
    if model.output_format.think is not None:
        capabilities.append("thinking")
    return capabilities


def _listed(server: Server, running: bool) -> list[ListedModel]:
    registry = server.registry
    listed = []
    for resident in registry.residents:
        model = resident.model
        if model is None:
            continue
        source = resident.slot.state.model_name or resident.name
        expires = None
        if running:
            limit = registry.keep_alive if resident.keep_alive is None else resident.keep_alive
            never = resident.pinned or limit < 0 or (resident.keep_alive is None and limit == 0)
            expires = _FOREVER if never else _time_text(max(resident.last_used, time.time()) + limit)
        listed.append(
            ListedModel(
                name=resident.name,
                model=resident.name,
                modified_at=_time_text(resident.last_used),
                size=resident.memory_bytes,
                digest=_digest(resident.name, source),
                details=ModelDetails(),
                expires_at=expires,
                size_vram=resident.memory_bytes if running else None,
                context_length=model.context_length if running else None,
            )
        )
    return listed


def tags(server: Server) -> ModelList:
    listed = _listed(server, running=False)
    served = {model.name for model in listed}
    policy = server.registry.policy
    for name in server.backend.pullable():
        if name in served or not policy.allow_patterns:
            continue  # without --allow-model, clients load nothing on demand: only the resident models serve
        try:
            policy.require_allowed(name)
        except ApiError:
            continue
        listed.append(ListedModel(name, name, _time_text(0), 0, _digest(name, name), ModelDetails()))
    return ModelList(listed)


def running(server: Server) -> ModelList:
    return ModelList(_listed(server, running=True))


def show(server: Server, name: str) -> ShowResponse:
    resident = server.registry.find(served_name(name))
    model = resident.model if resident is not None else None
    if resident is None or model is None:
        raise ApiError(404, f"model '{name}' not found (this server shows the models it holds)", code="model_not_found")
    info: dict[str, object] = {"general.name": resident.name, "general.source": resident.slot.state.model_name}
    if model.context_length:
        info["general.context_length"] = model.context_length
    if isinstance(model, EmbeddingModel):
        info["general.embedding_length"] = model.dimensions
    return ShowResponse(
        modelfile=f"FROM {resident.slot.state.model_name or resident.name}\n",
        parameters="",
        template="",
        details=ModelDetails(),
        model_info=info,
        capabilities=_capabilities(model),
        modified_at=_time_text(resident.last_used),
    )


def version() -> Version:
    return Version(OLLAMA_API_VERSION)


async def pull(server: Server, name: str, stream: bool) -> PullStatus | Stream:
    """Fetch a built-in model ahead of its first load: progress lines as it goes, then success."""
    name = served_name(name)
    backend = server.backend
    if name not in backend.pullable():
        known = ", ".join(backend.pullable()) or "none"
        raise ApiError(404, f"pull model manifest: {name} is not a built-in model of this server (built-in: {known})")
    server.registry.policy.require_allowed(name)
    if not stream:
        await _pulled(server, name, lambda text: None)
        return PullStatus("success")
    loop = asyncio.get_running_loop()
    statuses: asyncio.Queue[str | None] = asyncio.Queue()

    def progress(text: str) -> None:
        loop.call_soon_threadsafe(statuses.put_nowait, text)

    async def lines() -> AsyncIterator[bytes]:
        yield ndjson_line(PullStatus("pulling manifest"))
        pulling = asyncio.ensure_future(_pulled(server, name, progress))
        pulling.add_done_callback(lambda _: statuses.put_nowait(None))
        while (status := await statuses.get()) is not None:
            yield ndjson_line(PullStatus(status))
        pulling.result()  # its failure ends the stream with an error line
        yield ndjson_line(PullStatus("success"))

    return streamed(lines(), NDJSON, on_failure=error_lines)


async def _pulled(server: Server, name: str, progress: Callable[[str], None]) -> None:
    try:
        await asyncio.to_thread(server.backend.pull, name, progress)
    except (OSError, RuntimeError, ValueError) as exc:
        raise ApiError(500, f"pulling {name} failed: {exc}") from None
