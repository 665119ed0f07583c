"""The ``anthropic`` plugin: Anthropic's Messages API at ``POST /v1/messages`` (and ``count_tokens``), the API
Claude Code speaks.

Enable it with ``forgellm run --plugins anthropic``. Built only on the public plugin API (the
``forgellm`` package's names and hooks), as a third-party package could have been; every request goes
through the one generation pipeline, so authentication (the auth plugin reads Anthropic's
``x-api-key`` header), rate limits, logs and metrics apply to it as to /v1/chat/completions.
See docs/anthropic.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from forgellm import ApiError, hookimpl
from forgellm.plugins.anthropic.protocol import PATH, error_body
from forgellm.plugins.anthropic.routes import messages_router


@hookimpl
def register_routes(register: Callable[[Any], None]) -> None:
    register(messages_router())


@hookimpl
def register_error_shapes(register: Callable[[str, Callable[[ApiError], Any]], None]) -> None:
    register(PATH, error_body)


@hookimpl
def register_cors_headers(allow: Callable[[str], None]) -> None:
    # What Anthropic's clients send from a browser besides credentials; the versions are accepted, not checked.
    allow("anthropic-version")
    allow("anthropic-beta")
    allow("anthropic-dangerous-direct-browser-access")
