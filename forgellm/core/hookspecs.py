"""Hook specifications: every way a plugin can extend ForgeLLM.

Each spec documents itself in one line; docs/plugins.md holds the full reference
and tests/test_docs.py fails when a hook is missing from it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import click
import pluggy

if TYPE_CHECKING:
    from forgellm.core.api.request import Caller
    from forgellm.core.config.settings import Option, Settings
    from forgellm.core.engine.backend import Backend
    from forgellm.core.engine.generation import GenerationJob, Usage
    from forgellm.core.errors import ApiError
    from forgellm.core.http.request_context import RequestRecord
    from forgellm.core.identity import Identity
    from forgellm.core.server import Server

hookspec = pluggy.HookspecMarker("forgellm")
hookimpl = pluggy.HookimplMarker("forgellm")

# What the hooks that run inside the server's life cycle or a request may return instead of a value.
MaybeAwaitable = None | Awaitable[None]


@hookspec
def register_options(register: Callable[[Option], None]) -> None:
    """Declare the settings this plugin reads: call register(Option(...)) once per option."""


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add subcommands to the ``forgellm`` click group."""


@hookspec
def register_backends(register: Callable[[str, Backend], None], settings: Settings) -> None:
    """Register generation backends, configured from settings: call register(name, backend)."""


@hookspec
def register_routes(register: Callable[[Any], None], server: Server) -> None:
    """Register extra Litestar route handlers or routers: call register(handler)."""


@hookspec
def register_error_shapes(register: Callable[[str, Callable[[ApiError], Any]], None]) -> None:
    """Answer errors under a path prefix in your API's shape: call register(prefix, shape), shape(ApiError) -> body."""


@hookspec
def register_cors_headers(allow: Callable[[str], None], expose: Callable[[str], None]) -> None:
    """Name the request headers this plugin reads (allow) and the response headers it sets (expose) for browsers."""


@hookspec
def startup(server: Server) -> MaybeAwaitable:
    """Prepare this plugin's resources when the server starts; may return an awaitable."""


@hookspec
def shutdown(server: Server) -> MaybeAwaitable:
    """Release this plugin's resources when the server stops; may return an awaitable."""


@hookspec(firstresult=True)
def authenticate(request: Any, server: Server) -> Identity | None | Awaitable[Identity | None]:
    """Return the request's Identity, or None to let another plugin decide; raise Unauthorized for bad credentials."""


@hookspec
def authorize(
    identity: Identity | None, action: str, request: Any, server: Server
) -> bool | None | Awaitable[bool | None]:
    """Return False to forbid identity the action ('status', 'generate', 'load' or 'admin'), or None to abstain."""


@hookspec
def before_generate(
    identity: Identity | None, request: Any, job: GenerationJob, caller: Caller, server: Server
) -> MaybeAwaitable:
    """Inspect a generation before its prompt is tokenized; raise ApiError (for example a 429) to refuse it."""


@hookspec
def after_generate(
    identity: Identity | None, request: Any, job: GenerationJob, usage: Usage, caller: Caller, server: Server
) -> MaybeAwaitable:
    """Account for a generation once it ends (refused after before_generate: no tokens); usage holds its counts."""


@hookspec
def access_log(entry: RequestRecord, server: Server) -> None:
    """Record one finished HTTP request, described by a RequestRecord."""
