"""mlx-lm imported without changing the process's open-file limit.

Importing ``mlx_lm.utils`` sets RLIMIT_NOFILE to (2048, 4096) for the whole process: that lowers a
higher soft limit, so a server holding some 2,000 connections fails to accept more, and where the
hard limit is below 4096 the import itself fails (only root may raise a hard limit). So mlx-lm is
imported here with that one change skipped; the server raises the soft limit to the hard one
itself when it starts (``forgellm.core.http.connection_guard``).
"""

from __future__ import annotations

import contextlib
import importlib
import resource
from collections.abc import Iterator


@contextlib.contextmanager
def _open_file_limit_kept() -> Iterator[None]:
    set_limit = resource.setrlimit

    def setrlimit(which: int, limits: tuple[int, int]) -> None:
        if which != resource.RLIMIT_NOFILE:
            set_limit(which, limits)

    resource.setrlimit = setrlimit
    try:
        yield
    finally:
        resource.setrlimit = set_limit


def import_mlx_lm() -> None:
    """Import mlx-lm, keeping the open-file limit as it is."""
    with _open_file_limit_kept():
        importlib.import_module("mlx_lm.utils")
