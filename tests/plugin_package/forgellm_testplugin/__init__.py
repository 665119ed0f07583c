"""A small third-party plugin that implements every hook, so that each one is exercised through a real
installed entry point (tests/test_plugin_discovery.py), as Datasette's test plugin does.

It uses only the public plugin API (``forgellm``) and Litestar.
"""

from pathlib import Path

import click
from litestar import get
from litestar.di import NamedDependency

from forgellm import LOAD, ApiError, Identity, Option, Server, hookimpl

STATE = "testplugin"
GUEST_TOKEN = "testplugin-guest-token"


@get("/testplugin/hello")
async def hello(server: NamedDependency[Server]) -> dict:
    return {"plugin": "testplugin", "model_loaded": server.default_model.slot.state.loaded}


@get("/testplugin/state")
async def state(server: NamedDependency[Server]) -> dict:
    return server.plugin_state[STATE]


@click.command("testplugin-greet")
def greet() -> None:
    """Say hello (a command the testplugin adds)."""
    click.echo("hello from testplugin")


@hookimpl
def register_options(register):
    register(Option("testplugin_banned_word", "Prompts holding this word are refused.", default="forbidden"))
    register(Option("testplugin_shutdown_file", "A file the plugin writes 'stopped' to when the server stops."))


@hookimpl
def register_commands(cli):
    cli.add_command(greet)


@hookimpl
def register_backends(register, settings):
    from forgellm.backends.mlx import MlxBackend

    register("testplugin-mlx", MlxBackend.from_settings(settings))  # serve with --backend testplugin-mlx


@hookimpl
def register_routes(register, server):
    register(hello)
    register(state)


@hookimpl
def register_error_shapes(register):
    register("/testplugin", lambda error: {"testplugin_error": error.message})


@hookimpl
def register_cors_headers(allow, expose):
    allow("X-Testplugin-Token")
    expose("X-Testplugin-Seen")


@hookimpl
def startup(server):
    server.plugin_state[STATE] = {"started": True, "generated_tokens": 0, "requests_logged": 0, "subjects": []}


@hookimpl
def shutdown(server):
    path = server.settings.testplugin_shutdown_file
    if path:
        Path(path).write_text("stopped")


@hookimpl
def authenticate(request, server):
    if request.headers.get("x-testplugin-token") == GUEST_TOKEN:
        return Identity("testplugin:guest", frozenset({"generate"}), method="testplugin")
    return None  # not ours: another plugin decides, or the request is anonymous


@hookimpl
def authorize(identity, action, request, server):
    if identity is not None and identity.subject == "testplugin:guest" and action == LOAD:
        return False
    return None


@hookimpl
def before_generate(identity, request, job, server):
    if server.settings.testplugin_banned_word in job.prompt_text:
        raise ApiError(422, "testplugin refuses this prompt", code="refused")


@hookimpl
def after_generate(identity, usage, server):
    server.plugin_state[STATE]["generated_tokens"] += usage.completion_tokens
    server.plugin_state[STATE]["subjects"].append(identity.subject if identity else None)


@hookimpl
def access_log(entry, server):
    if STATE in server.plugin_state:
        server.plugin_state[STATE]["requests_logged"] += 1
