"""The OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions and /v1/embeddings.

Thin: each route declares its body and responses and hands the request to its endpoint's module
(``chat``, ``completions``, ``embeddings``), as vLLM lays out its OpenAI entry points. Errors use OpenAI's error
object; streams are server-sent events ending in ``data: [DONE]``.
"""

from __future__ import annotations

from litestar import Router, get
from litestar.di import NamedDependency
from litestar.params import FromPath
from litestar.response import Stream

from forgellm.core.api.openai.chat import serve_chat
from forgellm.core.api.openai.completions import serve_completion
from forgellm.core.api.openai.embeddings import EmbeddingsRequest, EmbeddingsResponse, serve_embeddings
from forgellm.core.api.openai.protocol import (
    CHAT_COMPLETION_EVENTS,
    COMPLETION_EVENTS,
    PREFIX,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    OpenAIError,
    error_body,
)
from forgellm.core.api.openai.serving import openai_errors
from forgellm.core.api.pipeline import GenerationService
from forgellm.core.api.request import Caller
from forgellm.core.errors import ApiError
from forgellm.core.http.errors import exception_handler
from forgellm.core.http.json_route import generation_post, json_post
from forgellm.core.http.openapi import EVENT_STREAM, GENERATION_ERRORS, error_responses, json_body
from forgellm.core.identity import GENERATE, STATUS
from forgellm.core.server import Server


@get(
    f"{PREFIX}/models",
    opt={"action": STATUS},
    summary="The models this server can serve now",
    responses=openai_errors(401, 403),
)
async def list_models(server: NamedDependency[Server]) -> ModelList:
    """Each model under the name it is served as (its source stays visible in /api/models)."""
    return ModelList(data=[ModelCard(id=name) for name in server.registry.names()])


@get(
    f"{PREFIX}/models/{{model_id:path}}",
    opt={"action": STATUS},
    summary="One model this server can serve now",
    responses=openai_errors(400, 401, 403, 404),
)
async def get_model(model_id: FromPath[str], server: NamedDependency[Server]) -> ModelCard:
    name = model_id.lstrip("/")
    resident = server.registry.find(name)
    if resident is None or resident.model is None:
        raise ApiError(404, f"The model '{name}' is not loaded", code="model_not_found")
    return ModelCard(id=resident.name)


@generation_post(
    f"{PREFIX}/completions",
    CompletionRequest,
    summary="OpenAI-compatible text completion",
    answer=(CompletionResponse, "The completion; with stream: true, server-sent events instead"),
    error_body=OpenAIError,
    stream=(EVENT_STREAM, COMPLETION_EVENTS, "With stream: true, each event's data is one of these, then [DONE]"),
)
async def completions(
    data: CompletionRequest, caller: NamedDependency[Caller], generations: NamedDependency[GenerationService]
) -> CompletionResponse | Stream:
    return await serve_completion(data, caller, generations)


@generation_post(
    f"{PREFIX}/chat/completions",
    ChatCompletionRequest,
    summary="OpenAI-compatible chat completion",
    answer=(ChatCompletionResponse, "The completion; with stream: true, server-sent events instead"),
    error_body=OpenAIError,
    stream=(EVENT_STREAM, CHAT_COMPLETION_EVENTS, "With stream: true, each event's data is one of these, then [DONE]"),
)
async def chat_completions(
    data: ChatCompletionRequest, caller: NamedDependency[Caller], generations: NamedDependency[GenerationService]
) -> ChatCompletionResponse | Stream:
    return await serve_chat(data, caller, generations)


@json_post(
    f"{PREFIX}/embeddings",
    EmbeddingsRequest,
    opt={"action": GENERATE},
    status_code=200,
    summary="OpenAI-compatible embeddings, from an embedding model",
    responses={
        **json_body(EmbeddingsResponse, "One vector per input, in the order of the inputs"),
        **error_responses(OpenAIError, *GENERATION_ERRORS),
    },
)
async def embeddings(
    data: EmbeddingsRequest, caller: NamedDependency[Caller], generations: NamedDependency[GenerationService]
) -> EmbeddingsResponse:
    return await serve_embeddings(data, caller, generations)


def openai_router() -> Router:
    """The OpenAI-compatible routes, answering errors in OpenAI's shape."""
    return Router(
        "/",
        route_handlers=[list_models, get_model, completions, chat_completions, embeddings],
        exception_handlers={Exception: exception_handler(error_body)},
    )
