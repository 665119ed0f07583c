"""The ``forgellm`` command: help, plugin listing, start-up errors, and one real server's life cycle."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from forgellm import __version__
from forgellm.cli import build_cli
from forgellm.testing import ServerProcess, wait_until_loaded

CORE_FLAGS = {
    "--host": "default: localhost",
    "--port": "default: 5001",
    "--model": "Hugging Face repo id",
    "--adapter": "LoRA adapter",
    "--plugins": "forgellm plugins",
    "--log-level": "default: info",
}


def invoke(*args: str):
    return CliRunner().invoke(build_cli(), list(args))


def test_run_help_explains_each_core_option():
    result = invoke("run", "--help")

    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # click wraps help text
    for flag, explanation in CORE_FLAGS.items():
        assert flag in text
        assert explanation in text, f"{flag}'s help should mention {explanation!r}"
    assert "FORGELLM_PORT" in text  # every option has an environment variable too


def test_top_level_help_lists_the_commands_and_version():
    result = invoke("--help")
    assert result.exit_code == 0
    assert "run" in result.output and "plugins" in result.output
    assert invoke("--version").output.strip().endswith(__version__)


def test_plugins_command_lists_mlx_with_register_backends():
    console_script = Path(sys.executable).with_name("forgellm")
    command = [str(console_script)] if console_script.exists() else [sys.executable, "-m", "forgellm"]

    result = subprocess.run([*command, "plugins"], capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    mlx = lines.index(f"mlx {__version__} (builtin, enabled)")
    assert lines[mlx + 1].split() == [
        "hooks:",
        "register_backends,",
        "register_commands,",
        "register_options,",
        "startup",
    ]


def test_unknown_plugin_fails_at_start_listing_the_available_ones():
    result = invoke("run", "--plugins", "nosuch")

    assert result.exit_code == 2
    assert "unknown plugin nosuch; available plugins:" in result.output
    assert "mlx" in result.output.split("available plugins:")[1]


def test_disabling_an_unknown_plugin_is_also_an_error():
    result = invoke("plugins", "--plugins", "no:nosuch")
    assert result.exit_code == 2
    assert "unknown plugin nosuch" in result.output


@pytest.mark.parametrize(("flag", "value"), [("--log-level", "loud"), ("--prefill-batch-size", "0")])
def test_bad_option_value_is_a_usage_error(flag, value):
    result = invoke("run", flag, value)
    assert result.exit_code == 2
    assert flag in result.output


@pytest.fixture(scope="module")
def started_with_model(tiny_model, tiny_adapter):
    """`forgellm run --model M --adapter A`, returned as soon as the port answers (not when the model is ready)."""
    args = ["--model", str(tiny_model), "--adapter", str(tiny_adapter)]
    with ServerProcess(args, env={"FORGELLM_MAX_TOKENS_CAP": "16"}, wait_ready=False) as process:
        first_status = httpx.get(f"{process.url}/api/model/status", timeout=30).json()
        yield process, first_status


def test_model_flag_opens_the_port_at_once_and_status_shows_the_load(started_with_model, tiny_model, tiny_adapter):
    process, first = started_with_model

    assert first["model_name"] == str(tiny_model)
    assert first["adapter_path"] == str(tiny_adapter)
    assert first["error"] is None
    assert first["is_loading"] or first["loaded"], "the guide's client would read this status as a failed load"
    with httpx.Client(base_url=process.url, timeout=30) as client:
        final = wait_until_loaded(client)
        assert final["loaded"] is True and final["adapter_path"] == str(tiny_adapter)
        assert client.post("/api/model/generate", json={"prompt": "Hi", "max_tokens": 16}).status_code == 200


def test_options_come_from_environment_variables(started_with_model):
    process, _ = started_with_model
    with httpx.Client(base_url=process.url, timeout=30) as client:
        wait_until_loaded(client)
        response = client.post("/api/model/generate", json={"prompt": "Hi", "max_tokens": 17})
    assert response.status_code == 400
    assert response.json() == {"success": False, "error": "max_tokens must be at most 16"}


def test_sigterm_shuts_down_cleanly_and_the_log_shows_the_port_opened_before_the_load(started_with_model, tiny_model):
    """Runs last in this module: it stops the shared process."""
    process, _ = started_with_model

    code, output = process.stop(signal.SIGTERM)

    assert "Traceback" not in output
    assert "Application shutdown complete" in output
    assert code == 0, output
    # uvicorn prints this once its socket listens; the tiny model's load ends after it.
    assert output.index("Uvicorn running on") < output.index(f"loaded {tiny_model} in"), output
