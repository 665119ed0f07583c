"""ForgeLLM: a model server for MLX language models, extended through pluggy plugins.

The names below are the public plugin API: a plugin (or a backend) needs nothing else from the
package, and they keep their meaning across versions. ``docs/plugins.md`` documents each hook;
``docs/api-dialects.md`` shows how an API dialect (a plugin's routes) uses the generation pipeline.
"""

from forgellm.core.api.assistant_turn import (
    AssistantTurn,
    ContentDelta,
    ReasoningDelta,
    ToolCallArguments,
    ToolCallStart,
    TurnEvent,
    TurnSplitter,
    template_tool,
    template_tool_call,
)
from forgellm.core.api.embeddings import EmbeddingRequest, Embeddings
from forgellm.core.api.generation import Generation, GenerationGroup, TurnChunk
from forgellm.core.api.guide.routes import guide_errors
from forgellm.core.api.health import PROBE_PATHS
from forgellm.core.api.models.routes import resident_model
from forgellm.core.api.openai.protocol import OpenAIError
from forgellm.core.api.openai.protocol import error_body as openai_error_body
from forgellm.core.api.pipeline import GenerationService
from forgellm.core.api.request import Caller, GenerationRequest, ToolChoice, client_sampling
from forgellm.core.config.settings import Option, Settings
from forgellm.core.engine.backend import (
    Backend,
    CacheStats,
    EmbeddingModel,
    Engine,
    LoadedModel,
    ModelSource,
    OutputFormat,
    Rank,
)
from forgellm.core.engine.generation import (
    LAYERED_SAMPLING,
    PREDICTION_SOURCE,
    Completion,
    Constraint,
    Delta,
    DraftTokens,
    GenerationJob,
    SamplingParams,
    TokenLogprob,
    TokenOutput,
    Usage,
)
from forgellm.core.errors import (
    INVALID_CREDENTIALS,
    ApiError,
    Forbidden,
    TemplateRefused,
    Unauthorized,
    bad_request,
    service_unavailable,
)
from forgellm.core.hookspecs import hookimpl
from forgellm.core.http.errors import as_api_error, exception_handler
from forgellm.core.http.json_route import generation_post, json_post
from forgellm.core.http.openapi import (
    EVENT_STREAM,
    GENERATION_ERRORS,
    any_of,
    error_responses,
    json_body,
    server_sent_event,
    streamed_as,
)
from forgellm.core.http.request_context import RequestRecord, record_of
from forgellm.core.http.streaming import streamed
from forgellm.core.http.strict_body import strict_body
from forgellm.core.identity import ADMIN, GENERATE, LOAD, STATUS, Identity
from forgellm.core.models.resident import parse_model_spec
from forgellm.core.models.sampling_defaults import checked_value as checked_sampling_value
from forgellm.core.plugin_manager import available_plugins
from forgellm.core.server import Server
from forgellm.version import __version__

__all__ = [
    "CacheStats",
    "ADMIN",
    "EVENT_STREAM",
    "GENERATE",
    "GENERATION_ERRORS",
    "INVALID_CREDENTIALS",
    "LAYERED_SAMPLING",
    "PREDICTION_SOURCE",
    "Rank",
    "LOAD",
    "PROBE_PATHS",
    "STATUS",
    "ApiError",
    "AssistantTurn",
    "Backend",
    "Caller",
    "Completion",
    "Constraint",
    "ContentDelta",
    "Delta",
    "DraftTokens",
    "EmbeddingModel",
    "EmbeddingRequest",
    "Embeddings",
    "Engine",
    "Forbidden",
    "Generation",
    "GenerationGroup",
    "GenerationJob",
    "GenerationRequest",
    "GenerationService",
    "Identity",
    "LoadedModel",
    "ModelSource",
    "OpenAIError",
    "Option",
    "OutputFormat",
    "ReasoningDelta",
    "RequestRecord",
    "SamplingParams",
    "Server",
    "Settings",
    "TemplateRefused",
    "TokenLogprob",
    "TokenOutput",
    "ToolCallArguments",
    "ToolCallStart",
    "ToolChoice",
    "TurnChunk",
    "TurnEvent",
    "TurnSplitter",
    "Unauthorized",
    "Usage",
    "__version__",
    "any_of",
    "as_api_error",
    "bad_request",
    "checked_sampling_value",
    "client_sampling",
    "error_responses",
    "available_plugins",
    "exception_handler",
    "generation_post",
    "guide_errors",
    "hookimpl",
    "json_body",
    "json_post",
    "openai_error_body",
    "record_of",
    "parse_model_spec",
    "resident_model",
    "server_sent_event",
    "service_unavailable",
    "streamed",
    "streamed_as",
    "strict_body",
    "template_tool",
    "template_tool_call",
]
