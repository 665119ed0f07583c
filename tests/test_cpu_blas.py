"""MLX's CPU matrix products run on the system's OpenBLAS when it is installed (FORGELLM_BLAS).

Each check runs in a fresh interpreter: the BLAS is chosen once, before MLX is imported.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest

from forgellm.backends.mlx import GGUF_KEEP_QUANTIZED, automatic_gguf_weights, cpu_blas
from forgellm.testing import ServerProcess

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MLX uses Accelerate on macOS")

# Whether the process mapped the system OpenBLAS (numpy brings its own, named libscipy_openblas), and an
# MLX float32 product checked against numpy's.
PROBE = """
import numpy as np
from forgellm.backends.mlx.bootstrap import prepare_process
prepare_process()
import mlx.core as mx
from forgellm.backends.mlx.cpu_blas import selected_blas
a = np.random.default_rng(0).standard_normal((37, 576), dtype=np.float32)
b = np.random.default_rng(1).standard_normal((576, 1536), dtype=np.float32)
assert np.allclose(np.array(mx.array(a) @ mx.array(b)), a @ b, atol=1e-3)
mapped = [line.split()[-1] for line in open("/proc/self/maps")]
print(selected_blas(), "openblas" if any("/libopenblas" in path for path in mapped) else "reference")
"""


def _probe(blas: str | None) -> str:
    env = {key: value for key, value in os.environ.items() if key != cpu_blas.ENV_VAR}
    if blas is not None:
        env[cpu_blas.ENV_VAR] = blas
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _system_openblas() -> bool:
    import ctypes

    try:
        ctypes.CDLL(cpu_blas.SYSTEM_OPENBLAS[0])
    except OSError:
        return False
    return True


needs_openblas = pytest.mark.skipif(not _system_openblas(), reason="OpenBLAS is not installed (libopenblas0-pthread)")


@needs_openblas
def test_auto_runs_mlx_on_the_system_openblas():
    assert _probe(None) == "libopenblas.so.0 openblas"


@needs_openblas
def test_importing_the_test_kit_chooses_the_blas_before_mlx_loads():
    # conftest imported forgellm.testing first; tiny_model imports MLX, so the kit must choose before it.
    assert cpu_blas.selected_blas() == cpu_blas.SYSTEM_OPENBLAS[0]


def test_bundled_keeps_mlx_on_its_own_blas():
    assert _probe("bundled") == "None reference"


def test_a_library_path_is_used_as_given():
    paths = glob.glob("/usr/lib/*/libopenblas.so.0") + glob.glob("/usr/lib*/libopenblas.so.0")
    if not paths:
        pytest.skip("OpenBLAS is not installed (libopenblas0-pthread)")
    assert _probe(paths[0]) == f"{paths[0]} openblas"


def test_a_blas_that_cannot_be_opened_stops_the_server_with_the_reason(tmp_path):
    missing = str(tmp_path / "libnothing.so")
    with pytest.raises(RuntimeError) as failed:
        with ServerProcess([], env={cpu_blas.ENV_VAR: missing}):
            pass
    assert f"{cpu_blas.ENV_VAR}={missing} cannot be used" in str(failed.value)


def test_auto_gguf_weights_dequantize_on_the_cpu_only_with_a_fast_blas_and_room(tmp_path, monkeypatch):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"\0" * 1000)
    monkeypatch.setattr(cpu_blas, "_selected", None)
    assert automatic_gguf_weights(gguf) == GGUF_KEEP_QUANTIZED
    monkeypatch.setattr(cpu_blas, "_selected", "libopenblas.so.0")
    assert automatic_gguf_weights(gguf) == "float32"
    monkeypatch.setattr("forgellm.backends.mlx.sources.physical_memory", lambda: 4 * 8 * 1000 - 1)
    assert automatic_gguf_weights(gguf) == GGUF_KEEP_QUANTIZED  # float32 would take over a quarter
