"""The Ollama dialect's routes: thin declarations over ``generation`` (chat, generate, embed) and ``models``
(tags, show, ps, version, pull), every error in Ollama's ``{"error": "..."}``."""

from __future__ import annotations

import time
from typing import Any

from litestar import Router, get
from litestar.di import NamedDependency
from litestar.response import Stream

from forgellm import (
    GENERATE,
    GENERATION_ERRORS,
    LOAD,
    STATUS,
    Caller,
    GenerationService,
    Server,
    any_of,
    error_responses,
    exception_handler,
    json_body,
    json_post,
    streamed_as,
)
from forgellm.plugins.ollama import generation, models
from forgellm.plugins.ollama.protocol import (
    NDJSON,
    ChatLine,
    ChatRequest,
    EmbedRequest,
    EmbedResponse,
    GenerateLine,
    GenerateRequest,
    ModelList,
    ModelRequest,
    OllamaError,
    PullStatus,
    Reply,
    ShowResponse,
    Version,
    error_body,
)

PATHS = ("/api/chat", "/api/generate", "/api/embed", "/api/tags", "/api/show", "/api/ps", "/api/version", "/api/pull")


def _generating(summary: str, answer: type) -> dict[str, Any]:
    return {
        "opt": {"action": GENERATE},
        "status_code": 200,
        "summary": summary,
        "responses": {
            **json_body(answer, "The answer; with stream (the default), NDJSON lines instead, the last with done"),
            **error_responses(OllamaError, *GENERATION_ERRORS),
        },
        "operation_class": streamed_as(NDJSON, any_of(answer, OllamaError), "NDJSON lines, the last with done"),
    }


@json_post("/api/chat", ChatRequest, **_generating("Ollama: chat", ChatLine))
async def chat(
    data: ChatRequest,
    caller: NamedDependency[Caller],
    generations: NamedDependency[GenerationService],
    server: NamedDependency[Server],
) -> ChatLine | Stream:
    started = time.monotonic()
    if not data.messages:
        name, reason = await generation.load_only(server, caller, generations, data.model, data.keep_alive)
        return ChatLine(model=name, created_at=generation.now_text(), message=Reply("assistant", ""), done=True,
                        done_reason=reason)  # fmt: skip
    request = generation.chat_request(data)
    started_generation = await generation.start_kept(server, caller, generations, request, data.keep_alive)
    return await generation.answer_chat(started_generation, data.stream, started)


@json_post("/api/generate", GenerateRequest, **_generating("Ollama: generate", GenerateLine))
async def generate(
    data: GenerateRequest,
    caller: NamedDependency[Caller],
    generations: NamedDependency[GenerationService],
    server: NamedDependency[Server],
) -> GenerateLine | Stream:
    started = time.monotonic()
    if not data.prompt:
        name, reason = await generation.load_only(server, caller, generations, data.model, data.keep_alive)
        return GenerateLine(model=name, created_at=generation.now_text(), response="", done=True, done_reason=reason)
    request = generation.generate_request(data)
    started_generation = await generation.start_kept(server, caller, generations, request, data.keep_alive)
    return await generation.answer_generate(started_generation, data.stream, started)


@json_post(
    "/api/embed",
    EmbedRequest,
    opt={"action": GENERATE},
    status_code=200,
    summary="Ollama: embed",
    responses={**json_body(EmbedResponse, "One vector per input"), **error_responses(OllamaError, *GENERATION_ERRORS)},
)
async def embed(
    data: EmbedRequest,
    caller: NamedDependency[Caller],
    generations: NamedDependency[GenerationService],
    server: NamedDependency[Server],
) -> EmbedResponse:
    return await generation.embed(data, caller, generations, server)


_LISTING: dict[str, Any] = {"opt": {"action": STATUS}, "responses": error_responses(OllamaError, 401, 403)}


@get("/api/tags", summary="Ollama: the models this server can serve", **_LISTING)
async def tags(server: NamedDependency[Server]) -> ModelList:
    return models.tags(server)


@get("/api/ps", summary="Ollama: the models loaded now", **_LISTING)
async def ps(server: NamedDependency[Server]) -> ModelList:
    return models.running(server)


@get("/api/version", summary="Ollama: the API version this dialect follows", **_LISTING)
async def version() -> Version:
    return models.version()


@json_post(
    "/api/show",
    ModelRequest,
    opt={"action": STATUS},
    status_code=200,
    summary="Ollama: one model's details",
    responses={**json_body(ShowResponse, "The model's details"), **error_responses(OllamaError, 400, 401, 403, 404)},
)
async def show(data: ModelRequest, server: NamedDependency[Server]) -> ShowResponse:
    return models.show(server, data.model_name())


@json_post(
    "/api/pull",
    ModelRequest,
    opt={"action": LOAD},
    status_code=200,
    summary="Ollama: fetch a built-in model ahead of its first load",
    responses={**json_body(PullStatus, "The last status"), **error_responses(OllamaError, 400, 401, 403, 404, 500)},
    operation_class=streamed_as(NDJSON, any_of(PullStatus, OllamaError), "NDJSON status lines, the last success"),
)
async def pull(data: ModelRequest, server: NamedDependency[Server]) -> PullStatus | Stream:
    return await models.pull(server, data.model_name(), data.stream)


def ollama_router() -> Router:
    return Router(
        "/",
        route_handlers=[chat, generate, embed, tags, ps, version, show, pull],
        exception_handlers={Exception: exception_handler(error_body)},
    )
