"""The ``forgellm`` command: ``run`` the server, list ``plugins``, and any subcommands plugins add."""

from __future__ import annotations

import json
import logging
import re
import signal
import sys
from functools import partial
from typing import Any

import click

from forgellm.backends.mlx.bootstrap import prepare_process
from forgellm.core.config.config_file import ConfigError, effective_config_toml, read_config_file
from forgellm.core.config.options import collect_options
from forgellm.core.config.settings import Option, Settings, normalized_root_path
from forgellm.core.http.connection_guard import ConnectionLimits, guarded_protocol, raise_open_file_limit
from forgellm.core.plugin_manager import (
    UnknownPlugin,
    available_plugins,
    create_plugin_manager,
    enabled_plugin_names,
    plugin_hooks,
)
from forgellm.version import __version__

# Files the process holds besides its connections: model files, logs, the keys file, Redis, pipes.
FILES_BESIDES_CONNECTIONS = 64


def _click_option(option: Option) -> click.Option:
    help_text = option.help if option.plugin == "core" else f"[{option.plugin} plugin] {option.help}"
    return click.Option(
        [option.flag, option.name],
        type=None if option.is_flag else option.type,
        default=option.default,
        multiple=option.multiple,
        is_flag=option.is_flag,
        envvar=option.envvar,
        show_envvar=True,
        show_default=not option.secret and option.default not in (None, ""),
        help=help_text,
    )


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _config_file_option(options: list[Option]) -> click.Option:
    """--config, read before every other option so its values become their defaults (click's default_map)."""

    def load(ctx: click.Context, param: click.Parameter, path: str | None) -> None:
        if path is None:
            return
        try:
            values = read_config_file(path, options)
        except ConfigError as exc:
            raise click.BadParameter(str(exc), ctx=ctx, param=param) from None
        ctx.default_map = {**(ctx.default_map or {}), **values}

    return click.Option(
        ["--config"],
        type=click.Path(exists=True, dir_okay=False),
        envvar="FORGELLM_CONFIG",
        show_envvar=True,
        is_eager=True,
        expose_value=False,
        callback=load,
        help="TOML file of options: core ones at the top level or in [server], each plugin's in a table "
        "named after it. FORGELLM_* variables and flags override it.",
    )


PRINT_CONFIG_OPTION = click.Option(
    ["--print-config"],
    is_flag=True,
    help="Print the effective configuration as TOML (secrets masked) and exit.",
)


def _run(options: list[Option], print_config: bool, **values) -> None:
    import uvicorn
    from uvicorn.main import STARTUP_FAILURE

    from forgellm.core.app import create_app

    settings = Settings(values, tuple(options))
    try:
        names = enabled_plugin_names(settings.plugins)
    except UnknownPlugin as exc:
        raise click.UsageError(str(exc)) from None
    if settings.ssl_keyfile and not settings.ssl_certfile:
        raise click.UsageError("--ssl-keyfile needs --ssl-certfile")
    if print_config:
        click.echo(effective_config_toml(settings), nl=False)
        return
    _configure_logging(settings.log_level)
    limits = _connection_limits(settings)
    app = create_app(settings, create_plugin_manager(names))
    # A rank other than 0 of a model sharded over processes serves no HTTP: it follows rank 0.
    follower_status = app.state.server.backend.follow()
    if follower_status is not None:
        sys.exit(follower_status)
    # uvicorn drains in-flight requests on SIGINT/SIGTERM, then re-raises the signal to the
    # handler it found: make that handler a clean exit, since the shutdown was graceful.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: sys.exit(0))
    trusted_proxies = [network for network in (settings.trusted_proxies or "").split(",") if network]
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        access_log=False,  # the logging plugin writes the access log
        timeout_graceful_shutdown=settings.drain_timeout,
        ssl_certfile=settings.ssl_certfile,
        ssl_keyfile=settings.ssl_keyfile,
        # uvicorn trusts X-Forwarded-* from 127.0.0.1 unless told otherwise; ForgeLLM trusts only --trusted-proxies.
        proxy_headers=bool(trusted_proxies),
        forwarded_allow_ips=trusted_proxies,
        root_path=normalized_root_path(settings.root_path),
        http=guarded_protocol(limits),
    )
    logging.getLogger("uvicorn.error").addFilter(_startup_failure_in_one_line)
    server = uvicorn.Server(config)
    server.run()
    if not server.started:
        sys.exit(STARTUP_FAILURE)


def _startup_failure_in_one_line(record: logging.LogRecord) -> bool:
    """A plugin's refusal to start (a keys file others may write, a storage that does not answer) as its message
    alone: Litestar hands uvicorn the whole formatted traceback, whose last line is that message."""
    message = record.getMessage()
    if message.lstrip(" +").startswith(("Traceback", "Exception Group Traceback")):
        lines = [line.strip(" |") for line in message.splitlines()]
        last = next(line for line in reversed(lines) if line and not line.startswith(("+-", "+")))
        record.msg, record.args = "cannot start: " + re.sub(r"^[\w.]+: ", "", last), ()
    return True


def _connection_limits(settings: Settings) -> ConnectionLimits:
    """The limits for uvicorn's connections, with --max-connections lowered to fit the open-file limit."""
    open_files = raise_open_file_limit()
    fitting = max(1, open_files - FILES_BESIDES_CONNECTIONS)
    max_connections = settings.max_connections
    if max_connections > fitting:
        logging.getLogger("forgellm").warning(
            "--max-connections %d lowered to %d: the open-file limit is %d", max_connections, fitting, open_files
        )
        max_connections = fitting
    return ConnectionLimits(
        settings.header_timeout, settings.max_header_size, max_connections, body_timeout=settings.body_timeout
    )


def build_cli() -> click.Group:
    pm = create_plugin_manager()  # every installed plugin: their options and commands exist even when off
    options = collect_options(pm)

    @click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
    @click.version_option(__version__, prog_name="forgellm")
    def cli() -> None:
        """ForgeLLM: a model server for MLX language models.

        Serves the integration guide's API (/api/model/...) and an OpenAI-compatible
        API (/v1/...). Every option can also be set through the FORGELLM_* environment
        variable shown beside it.
        """

    run = click.Command(
        "run",
        callback=partial(_run, options),
        params=[_config_file_option(options), *map(_click_option, options), PRINT_CONFIG_OPTION],
        help="Start the server. The port opens at once and the model (--model, else the backend's default, "
        "smollm2-135m-instruct for mlx) loads in the background; --no-model starts with none.",
    )
    cli.add_command(run)

    @cli.command("plugins")
    @click.option(
        "--plugins", "spec", default="", envvar="FORGELLM_PLUGINS", help="The --plugins value to show as enabled."
    )
    @click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
    def list_plugins(spec: str, as_json: bool) -> None:
        """List every installed plugin, its version, whether it is enabled, and the hooks it implements."""
        available = available_plugins()
        try:
            enabled = set(enabled_plugin_names(spec, available))
        except UnknownPlugin as exc:
            raise click.UsageError(str(exc)) from None
        rows: list[dict[str, Any]] = [
            {
                "name": name,
                "version": info.version,
                "source": info.source,
                "default": info.default,
                "enabled": name in enabled,
                "hooks": plugin_hooks(pm, name),
            }
            for name, info in available.items()
        ]
        if as_json:
            click.echo(json.dumps(rows, indent=2))
            return
        for row in rows:
            state = "enabled" if row["enabled"] else ("disabled" if row["default"] else "opt-in")
            click.echo(f"{row['name']} {row['version']} ({row['source']}, {state})")
            click.echo(f"    hooks: {', '.join(row['hooks']) or '-'}")

    pm.hook.register_commands(cli=cli)
    return cli


def main() -> None:
    # Before the plugins are loaded: the MLX backend imports MLX, whose BLAS must be chosen first.
    prepare_process()
    build_cli()(prog_name="forgellm")
