"""ForgeLLM: a model server for MLX language models, extended through pluggy plugins.

The names below are the public plugin API: a plugin (or a backend) needs nothing else from the
package, and they keep their meaning across versions. ``docs/plugins.md`` documents each hook.
"""

from forgellm.core.config.settings import Option, Settings
from forgellm.core.engine.backend import Backend, Engine, LoadedModel, OutputFormat
from forgellm.core.engine.generation import (
    Completion,
    Constraint,
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
from forgellm.core.http.request_context import RequestRecord, record_of
from forgellm.core.identity import ADMIN, GENERATE, LOAD, STATUS, Identity
from forgellm.core.server import Server
from forgellm.version import __version__

__all__ = [
    "ADMIN",
    "GENERATE",
    "INVALID_CREDENTIALS",
    "LOAD",
    "STATUS",
    "ApiError",
    "Backend",
    "Completion",
    "Constraint",
    "Engine",
    "Forbidden",
    "GenerationJob",
    "Identity",
    "LoadedModel",
    "Option",
    "OutputFormat",
    "RequestRecord",
    "SamplingParams",
    "Server",
    "Settings",
    "TemplateRefused",
    "TokenLogprob",
    "TokenOutput",
    "Unauthorized",
    "Usage",
    "__version__",
    "bad_request",
    "hookimpl",
    "record_of",
    "service_unavailable",
]
