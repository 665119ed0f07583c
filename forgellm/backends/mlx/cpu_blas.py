"""MLX's CPU matrix products on an optimized BLAS, where the system has one.

MLX's Linux wheels (``mlx[cpu]``) link the reference BLAS (netlib) for float matrix products,
which on a 2-core x86 machine multiplies about 50 times slower than OpenBLAS: a 37x576 by
576x1536 float32 product took 31 ms against 0.6 ms. MLX calls ``cblas_sgemm`` through the
dynamic linker, and the loader binds it to the first library in the global scope that defines
it; a BLAS opened with ``RTLD_GLOBAL`` before MLX is imported is that library. So this module
must run before the first ``import mlx``: ``bootstrap.prepare_process()`` runs it.

``FORGELLM_BLAS`` chooses: ``auto`` (the default) opens the system's OpenBLAS when installed
(Debian and Ubuntu: ``libopenblas0-pthread``), ``bundled`` keeps MLX's own, and a path opens
that library (any BLAS with the CBLAS interface). On macOS MLX uses Accelerate and nothing is
done. It cannot be a command-line option: the choice is made before options are parsed.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

logger = logging.getLogger("forgellm.blas")

ENV_VAR = "FORGELLM_BLAS"
AUTO = "auto"
BUNDLED = "bundled"
SYSTEM_OPENBLAS = ("libopenblas.so.0", "libopenblas.so")

_selected: str | None = None
_problem: str | None = None


def select_blas(choice: str | None = None) -> None:
    """Open the BLAS that ``choice`` (default: ``$FORGELLM_BLAS``, else auto) names. Too late once mlx is
    imported, and a no-op then; a library that cannot be opened is reported by ``blas_problem()``."""
    global _selected, _problem
    choice = (choice or os.environ.get(ENV_VAR) or AUTO).strip()
    if choice == BUNDLED or not sys.platform.startswith("linux") or "mlx.core" in sys.modules:
        return
    for name in SYSTEM_OPENBLAS if choice == AUTO else (choice,):
        try:
            library = ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
        except OSError as exc:
            problem = str(exc)
        else:
            if hasattr(library, "cblas_sgemm"):
                _selected = name
                return
            problem = f"{name} has no cblas_sgemm"
        if choice != AUTO:  # only an explicit choice that fails is a problem; auto falls back quietly
            _problem = f"{ENV_VAR}={choice} cannot be used ({problem})"


def selected_blas() -> str | None:
    """The BLAS MLX's CPU matrix products run on, or None for MLX's bundled reference BLAS."""
    return _selected


def blas_problem() -> str | None:
    """Why an explicitly chosen BLAS is not in use, or None."""
    return _problem
