"""Hook specifications: every way a plugin can extend ForgeLLM.

Each spec documents itself in one line; docs/plugins.md holds the full reference
and tests/test_docs.py fails when a hook is missing from it.
"""

import pluggy

hookspec = pluggy.HookspecMarker("forgellm")
hookimpl = pluggy.HookimplMarker("forgellm")


@hookspec
def register_options(register):
    """Declare the settings this plugin reads: call register(Option(...)) once per option."""


@hookspec
def register_commands(cli):
    """Add subcommands to the ``forgellm`` click group."""


@hookspec
def register_backends(register):
    """Register generation backends: call register(name, backend)."""


@hookspec
def register_routes(register, server):
    """Register extra Litestar route handlers: call register(handler)."""


@hookspec
def startup(server):
    """Prepare this plugin's resources when the server starts; may return an awaitable."""


@hookspec
def shutdown(server):
    """Release this plugin's resources when the server stops; may return an awaitable."""


@hookspec(firstresult=True)
def authenticate(request, server):
    """Return an Identity for the request's credentials, or None to let another plugin decide; raise Unauthorized for bad ones."""


@hookspec
def authorize(identity, action, request, server):
    """Return False to forbid identity the action ('status', 'generate', 'load' or 'admin'), or None to abstain."""


@hookspec
def before_generate(identity, request, job, server):
    """Inspect a generation before it is queued; raise ApiError (for example a 429) to refuse it."""


@hookspec
def after_generate(identity, request, job, usage, server):
    """Account for a finished generation; usage holds its prompt and completion token counts."""


@hookspec
def access_log(entry, server):
    """Record one finished HTTP request, described by an AccessLogEntry."""
