"""The MLX backend as a plugin (a default one): its options, its ``pull`` command, the backend it registers,
and a check at start. It uses the hooks a third-party backend would."""

from __future__ import annotations

import logging
from collections.abc import Callable

import click
import mlx.core as mx

from forgellm import Backend, Option, Server, Settings, hookimpl
from forgellm.backends.mlx import cpu_blas
from forgellm.backends.mlx.backend import MlxBackend
from forgellm.backends.mlx.options import MLX_OPTIONS
from forgellm.backends.mlx.pull import pull_command

logger = logging.getLogger("forgellm.mlx")


@hookimpl
def register_options(register: Callable[[Option], None]) -> None:
    for option in MLX_OPTIONS:
        register(option)


@hookimpl
def register_commands(cli: click.Group) -> None:
    cli.add_command(pull_command)


@hookimpl
def register_backends(register: Callable[[str, Backend], None], settings: Settings) -> None:
    register("mlx", MlxBackend.from_settings(settings))


@hookimpl
def startup(server: Server) -> None:
    problem = cpu_blas.blas_problem()
    if problem:
        raise RuntimeError(problem)
    if isinstance(server.backend, MlxBackend) and mx.default_device().type == mx.DeviceType.cpu:
        blas = cpu_blas.selected_blas()
        if blas:
            logger.info("MLX runs on the CPU; its matrix products use %s", blas)
        else:
            logger.warning(
                "MLX runs on the CPU with its bundled reference BLAS, which is slow; install OpenBLAS "
                "(Debian/Ubuntu: apt install libopenblas0-pthread) for much faster prompts"
            )
