"""The ``responses`` plugin: OpenAI's Responses API at ``POST /v1/responses``, the API Codex CLI speaks.

Enable it with ``forgellm run --plugins responses``. Built only on the public plugin API (the
``forgellm`` package's names and hooks), as a third-party package could have been; every request goes
through the one generation pipeline, so authentication, rate limits, logs and metrics apply to it as
to /v1/chat/completions. See docs/responses.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from forgellm import ApiError, Option, Server, hookimpl, openai_error_body
from forgellm.plugins.responses.protocol import PATH
from forgellm.plugins.responses.routes import STATE_KEY, responses_router
from forgellm.plugins.responses.store import ResponseStore


@hookimpl
def register_options(register: Callable[[Option], None]) -> None:
    register(
        Option(
            "responses_store_size",
            "How many responses the responses plugin keeps for previous_response_id (least recently used go "
            "first; 0 keeps none).",
            type=click.IntRange(min=0),
            default=256,
        )
    )


@hookimpl
def register_routes(register: Callable[[Any], None]) -> None:
    register(responses_router())


@hookimpl
def register_error_shapes(register: Callable[[str, Callable[[ApiError], Any]], None]) -> None:
    register(PATH, openai_error_body)


@hookimpl
def startup(server: Server) -> None:
    server.plugin_state[STATE_KEY] = ResponseStore(server.settings.responses_store_size)
