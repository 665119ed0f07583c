"""``forgellm keys add | list | revoke``: manage the keys file the auth plugin reads."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import limits

from forgellm.plugins.auth.keys_file import KeysFileError, add_key, default_keys_path, read_records, revoke_key
from forgellm.plugins.auth.scopes import ALL_SCOPES, GENERATE_SCOPE, parse_scopes

keys_file_option = click.option(
    "--api-keys-file",
    "path",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="FORGELLM_API_KEYS_FILE",
    show_envvar=True,
    help=f"The keys file. Default: {default_keys_path()}",
)


def _path(path: Path | None) -> Path:
    return path.expanduser() if path else default_keys_path()


@contextlib.contextmanager
def _reported() -> Iterator[None]:
    """Problems with the keys file as one clear line, not a traceback."""
    try:
        yield
    except KeysFileError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot use {exc.filename}: {exc.strerror}") from None


def _scopes(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    try:
        return parse_scopes(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _limit(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    try:
        limits.parse_many(value)  # as the ratelimit plugin reads it: one limit, or several joined by ";"
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a limit like 10/minute, 20000/hour or 10/second;300/hour") from None
    return value


@click.group("keys")
def keys() -> None:
    """Create, list and revoke the API keys the auth plugin accepts.

    Keys live in a keys file that holds only their SHA-256 digests. A running server
    re-reads the file when it changes, so new and revoked keys take effect at once.
    """


@keys.command("add")
@click.argument("name")
@click.option(
    "--scopes",
    default=GENERATE_SCOPE,
    show_default=True,
    callback=_scopes,
    help=f"Comma-separated scopes: {', '.join(sorted(ALL_SCOPES))} (admin implies all).",
)
@click.option(
    "--rate-limit",
    callback=_limit,
    help="Requests this key may make, e.g. 10/minute or 10/second;300/hour (ratelimit plugin).",
)
@click.option(
    "--token-limit",
    callback=_limit,
    help="Tokens this key may generate, e.g. 20000/hour (ratelimit plugin).",
)
@keys_file_option
def add(name: str, scopes: tuple[str, ...], rate_limit: str | None, token_limit: str | None, path: Path | None) -> None:
    """Create the key NAME and print it; only its digest is stored, so this is the one time it is shown.

    The key alone goes to standard output (KEY=$(forgellm keys add ci) works); notes go to standard error.
    """
    path = _path(path)
    with _reported():
        key = add_key(path, name, scopes, rate_limit, token_limit)
    click.echo(f"Created key {name!r} with scopes {', '.join(scopes)} in {path}.", err=True)
    click.echo("Store it now: it cannot be shown again.", err=True)
    click.echo(key)


@keys.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@keys_file_option
def list_keys(as_json: bool, path: Path | None) -> None:
    """List the keys by name, with their scopes and limits (never the keys or their digests)."""
    path = _path(path)
    with _reported():
        records = read_records(path)
    rows: list[dict[str, Any]] = [
        {
            "name": record.name,
            "scopes": list(record.scopes),
            "rate_limit": record.rate_limit,
            "token_limit": record.token_limit,
            "created": record.created,
        }
        for record in records
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo(f"No keys in {path}.", err=True)
        return
    for row in rows:
        limits_text = ", ".join(f"{field}={row[field]}" for field in ("rate_limit", "token_limit") if row[field])
        click.echo(
            f"{row['name']}  scopes: {','.join(row['scopes'])}  created: {row['created']}  {limits_text}".rstrip()
        )


@keys.command("revoke")
@click.argument("name")
@keys_file_option
def revoke(name: str, path: Path | None) -> None:
    """Delete the key NAME; a running server refuses it from its next request."""
    path = _path(path)
    with _reported():
        revoke_key(path, name)
    click.echo(f"Revoked key {name!r}.", err=True)
