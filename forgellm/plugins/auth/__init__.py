"""The ``auth`` plugin: API keys and JWTs on every route but the health probes, with scopes.

Enable it with ``forgellm run --plugins auth``. It implements the core's authenticate and
authorize hooks; no route checks credentials itself. See docs/security.md.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import click

from forgellm import Identity, Option, Server, hookimpl
from forgellm.plugins.auth.authenticator import Authenticator
from forgellm.plugins.auth.commands import keys
from forgellm.plugins.auth.options import AUTH_OPTIONS
from forgellm.plugins.auth.scopes import permits

logger = logging.getLogger("forgellm.auth")

STATE_KEY = "auth"


@hookimpl
def register_options(register: Callable[[Option], None]) -> None:
    for option in AUTH_OPTIONS:
        register(option)


@hookimpl
def register_commands(cli: click.Group) -> None:
    cli.add_command(keys)


@hookimpl
def startup(server: Server) -> None:
    authenticator = Authenticator.from_settings(server.settings)
    server.plugin_state[STATE_KEY] = authenticator
    logger.info("auth: accepting %s", authenticator.describe())


# trylast: another authentication plugin (mTLS, a session cookie...) gets the first word;
# when none claims the request, this one decides, and "no credentials" is a 401, never anonymous.
@hookimpl(trylast=True)
def authenticate(request: Any, server: Server) -> Identity | None:
    return server.plugin_state[STATE_KEY].authenticate(request.headers)


@hookimpl
def authorize(identity: Identity | None, action: str, request: Any, server: Server) -> bool | None:
    if identity is None or not permits(identity.scopes, action):
        return False
    return None


@hookimpl
def register_cors_headers(allow: Callable[[str], None]) -> None:
    allow("Authorization")
    allow("X-API-Key")
