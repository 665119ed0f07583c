"""The process made ready for MLX, before anything imports it: the BLAS MLX's CPU backend binds to is chosen
(``cpu_blas``), and mlx-lm is imported without the change to the open-file limit its import would make
(``open_file_limit``). The CLI and the test kit call ``prepare_process()`` first thing; nothing else here
acts on import."""

from __future__ import annotations

from forgellm.backends.mlx.cpu_blas import select_blas
from forgellm.backends.mlx.open_file_limit import import_mlx_lm


def prepare_process() -> None:
    select_blas()
    import_mlx_lm()
