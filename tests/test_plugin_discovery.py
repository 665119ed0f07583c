"""A third-party plugin found through its package's ``forgellm`` entry point, as users install one.

tests/plugin_package is built by its own build backend (setuptools) and installed with pip into a
temporary directory, which joins sys.path (and PYTHONPATH for subprocesses) for this module only:
the project's environment is never changed, and nothing needs the network.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from forgellm.cli import build_cli
from forgellm.core import hookspecs
from forgellm.core.plugin_manager import available_plugins
from forgellm.testing import ServerProcess, test_client

HOOKS = {name for name in dir(hookspecs) if getattr(getattr(hookspecs, name), "forgellm_spec", None)}

PLUGIN_PACKAGE = Path(__file__).parent / "plugin_package"
PLUGIN_MODULE = "forgellm_testplugin"


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory):
    """The test plugin's package, installed where only this module's tests see it; yields that directory."""
    source = tmp_path_factory.mktemp("plugin-source")
    # Build from a copy: setuptools writes build/ and *.egg-info next to the sources.
    shutil.copytree(PLUGIN_PACKAGE, source, dirs_exist_ok=True, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    site = tmp_path_factory.mktemp("plugin-site")
    install = subprocess.run(
        # --no-build-isolation and --no-index: build with the setuptools installed here, offline.
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index"]
        + ["--target", str(site), str(source)],
        capture_output=True,
        text=True,
    )
    if install.returncode != 0:
        pytest.fail(f"could not build and install tests/plugin_package:\n{install.stdout}\n{install.stderr}")
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    try:
        yield site
    finally:
        sys.path.remove(str(site))
        sys.modules.pop(PLUGIN_MODULE, None)
        importlib.invalidate_caches()


def test_the_entry_point_is_discovered_with_its_distribution(installed_plugin):
    info = available_plugins()["testplugin"]

    assert info.version == "1.2.3"
    assert info.source == "forgellm-testplugin"
    assert info.default is True  # installed plugins are on unless disabled, as with pytest and llm
    assert info.plugin().__name__ == PLUGIN_MODULE


def test_forgellm_plugins_lists_it_with_version_and_hooks(installed_plugin):
    result = subprocess.run(
        [sys.executable, "-m", "forgellm", "plugins", "--json"],
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(installed_plugin), os.environ.get("PYTHONPATH", "")])},
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["testplugin"] == {
        "name": "testplugin",
        "version": "1.2.3",
        "source": "forgellm-testplugin",
        "default": True,
        "enabled": True,
        "hooks": sorted(HOOKS),
    }
    assert "register_backends" in rows["mlx"]["hooks"]


def test_disabled_plugin_is_listed_as_disabled(installed_plugin):
    result = CliRunner().invoke(build_cli(), ["plugins", "--plugins", "no:testplugin"])

    assert result.exit_code == 0, result.output
    assert "testplugin 1.2.3 (forgellm-testplugin, disabled)" in result.output
    assert f"hooks: {', '.join(sorted(HOOKS))}" in result.output


def test_hook_register_options_makes_a_run_flag_and_env_var(installed_plugin):
    result = CliRunner().invoke(build_cli(), ["run", "--help"])

    assert result.exit_code == 0, result.output
    assert "--testplugin-banned-word" in result.output
    assert "FORGELLM_TESTPLUGIN_BANNED_WORD" in result.output
    assert "[testplugin plugin]" in result.output


def test_unknown_plugin_lists_the_installed_ones(installed_plugin):
    result = CliRunner().invoke(build_cli(), ["run", "--plugins", "nosuch"])

    assert result.exit_code == 2
    assert "unknown plugin nosuch" in result.output
    assert "testplugin" in result.output and "mlx" in result.output


@pytest.fixture(scope="module")
def plugin_server(installed_plugin, tiny_model):
    with test_client(tiny_model) as c:
        yield c


def test_hook_register_routes_serves_its_route(plugin_server):
    response = plugin_server.get("/testplugin/hello")

    assert response.status_code == 200
    assert response.json() == {"plugin": "testplugin", "model_loaded": True}


def test_hook_register_error_shapes_answers_its_paths_in_its_shape(plugin_server):
    response = plugin_server.get("/testplugin/no-such-route")

    assert response.status_code == 404
    assert response.json() == {"testplugin_error": "Not found"}
    assert "testplugin_error" not in plugin_server.get("/no-such-route").json()


def test_hook_before_generate_refuses_with_the_envelope(plugin_server):
    refused = plugin_server.post("/api/model/generate", json={"prompt": "say forbidden things", "max_tokens": 4})

    assert refused.status_code == 422
    assert refused.json() == {"success": False, "error": "testplugin refuses this prompt"}
    allowed = plugin_server.post("/api/model/generate", json={"prompt": "say nice things", "max_tokens": 4})
    assert allowed.status_code == 200


def generate_status(client, prompt: str) -> int:
    return client.post("/api/model/generate", json={"prompt": prompt, "max_tokens": 4}).status_code


def test_hook_register_options_value_configures_it(installed_plugin, tiny_model):
    with test_client(tiny_model, testplugin_banned_word="nice") as c:
        assert generate_status(c, "say nice things") == 422
        assert generate_status(c, "say forbidden things") == 200


def test_no_colon_name_switches_it_off(installed_plugin, tiny_model):
    with test_client(tiny_model, plugins="no:testplugin") as c:
        assert c.get("/testplugin/hello").status_code == 404
        assert generate_status(c, "say forbidden things") == 200


# -- every hook, through the installed plugin (it implements them all) ------------------------------


def test_every_hook_is_implemented_by_the_test_plugin_and_has_a_test(installed_plugin):
    module = available_plugins()["testplugin"].plugin()
    implemented = {name for name in HOOKS if hasattr(getattr(module, name, None), "forgellm_impl")}
    assert implemented == HOOKS
    tests = [name for name in globals() if name.startswith("test_hook_")]
    untested = [hook for hook in HOOKS if not any(hook in test for test in tests)]
    assert untested == [], f"no test_hook_* test names these hooks: {untested}"


def test_hook_register_commands_adds_a_subcommand(installed_plugin):
    result = CliRunner().invoke(build_cli(), ["testplugin-greet"])
    assert result.exit_code == 0, result.output
    assert result.output == "hello from testplugin\n"


def test_hook_register_backends_serves_with_the_backend_the_settings_name(installed_plugin, tiny_model):
    with test_client(tiny_model, backend="testplugin-mlx") as c:
        assert c.app.state.server.backend is c.app.state.server.backends["testplugin-mlx"]
        assert generate_status(c, "say nice things") == 200


def test_hook_register_cors_headers_lets_browsers_send_and_read_its_headers(installed_plugin):
    origin = "https://app.example"
    with test_client(cors_origin=(origin,)) as c:
        preflight = c.options(
            "/api/model/status",
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "x-testplugin-token",
            },
        )
        assert preflight.status_code in (200, 204)
        assert "x-testplugin-token" in preflight.headers["access-control-allow-headers"].lower()
        answer = c.get("/healthz", headers={"Origin": origin})
        assert "x-testplugin-seen" in answer.headers["access-control-expose-headers"].lower()


def test_hook_startup_and_shutdown_run_in_a_real_process(installed_plugin, tmp_path):
    marker = tmp_path / "stopped"
    env = {"PYTHONPATH": os.pathsep.join([str(installed_plugin), os.environ.get("PYTHONPATH", "")])}
    with ServerProcess(["--testplugin-shutdown-file", str(marker)], env=env, wait_ready=False) as server:
        assert httpx.get(f"{server.url}/testplugin/state").json()["started"] is True
        code, _ = server.stop()
    assert code == 0
    assert marker.read_text() == "stopped"


def test_hook_authenticate_and_authorize_decide_who_may_do_what(installed_plugin, tiny_model):
    guest = {"X-Testplugin-Token": "testplugin-guest-token"}
    with test_client(tiny_model) as c:
        assert c.post("/api/model/generate", json={"prompt": "hi", "max_tokens": 2}, headers=guest).status_code == 200
        load = c.post("/api/model/load", json={"model_name": "x"}, headers=guest)
        assert load.status_code == 403 and load.json() == {"success": False, "error": "Not allowed to load"}
        assert c.get("/testplugin/state").json()["subjects"] == ["testplugin:guest"]


def test_hook_after_generate_and_access_log_account_for_each_request(installed_plugin, tiny_model):
    with test_client(tiny_model) as c:
        before = c.get("/testplugin/state").json()
        assert c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3}).status_code == 200
        after = c.get("/testplugin/state").json()
    assert after["generated_tokens"] - before["generated_tokens"] == 3
    assert after["requests_logged"] - before["requests_logged"] == 2  # the completion and the first state read
