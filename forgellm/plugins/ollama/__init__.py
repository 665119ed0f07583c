"""The ``ollama`` plugin: Ollama's API (``/api/chat``, ``/api/generate``, ``/api/embed``, ``/api/tags``,
``/api/show``, ``/api/ps``, ``/api/version``, ``/api/pull``), which many local apps and the ``ollama`` client
libraries speak.

Enable it with ``forgellm run --plugins ollama``. Built only on the public plugin API (the ``forgellm``
package's names and hooks), as a third-party package could have been; every request goes through the one
generation pipeline, so authentication, rate limits, logs and metrics apply to it as to /v1. Errors are
Ollama's ``{"error": "..."}``. See docs/ollama.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from forgellm import ApiError, hookimpl
from forgellm.plugins.ollama.protocol import error_body
from forgellm.plugins.ollama.routes import PATHS, ollama_router


@hookimpl
def register_routes(register: Callable[[Any], None]) -> None:
    register(ollama_router())


@hookimpl
def register_error_shapes(register: Callable[[str, Callable[[ApiError], Any]], None]) -> None:
    for path in PATHS:
        register(path, error_body)
