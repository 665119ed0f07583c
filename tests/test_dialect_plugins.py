"""What the ``responses`` and ``anthropic`` plugins share: built on the public plugin API only (as every built-in
plugin is), listed, in the OpenAPI schema, and accounted for (scopes, access log, metrics) exactly as
/v1/chat/completions is."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_metrics import scrape, value

import forgellm
from forgellm.testing import test_client

PLUGINS = Path(forgellm.__file__).parent / "plugins"
DIALECTS = ("responses", "anthropic")
ASK = {
    "/v1/responses": {"input": "Hello", "max_output_tokens": 3},
    "/v1/messages": {"max_tokens": 3, "messages": [{"role": "user", "content": "Hello"}]},
}


PACKAGE = Path(forgellm.__file__).parent
# Every built-in plugin, each a module or a package of its own: the dialects, the operational plugins and the
# MLX backend. Each is built as a third-party package must be, on forgellm's public API only.
BUILT_IN = sorted(
    [path for path in PLUGINS.iterdir() if path.suffix == ".py" and path.stem != "__init__"]
    + [path for path in PLUGINS.iterdir() if path.is_dir() and (path / "__init__.py").exists()]
    + [PACKAGE / "backends" / "mlx"]
)


@pytest.mark.parametrize("plugin", BUILT_IN, ids=lambda path: path.stem)
def test_the_plugin_imports_nothing_but_the_public_api(plugin):
    own = ".".join(plugin.relative_to(PACKAGE.parent).with_suffix("").parts)
    modules = sorted(plugin.rglob("*.py")) if plugin.is_dir() else [plugin]
    for module in modules:
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("forgellm"):
                if node.module == own or node.module.startswith(own + "."):
                    continue
                assert node.module == "forgellm", f"{module.name} imports from {node.module}"
                for alias in node.names:
                    assert alias.name in forgellm.__all__, f"{module.name} imports {alias.name}, not public API"
            elif isinstance(node, ast.Import):
                assert not any(alias.name.startswith("forgellm") for alias in node.names), module.name


def test_forgellm_plugins_lists_both_with_their_hooks():
    result = subprocess.run(
        [sys.executable, "-m", "forgellm", "plugins", "--json", "--plugins", "responses"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["responses"]["enabled"] is True and rows["anthropic"]["enabled"] is False
    assert {"register_routes", "register_error_shapes"} <= set(rows["responses"]["hooks"])
    assert {"register_routes", "register_error_shapes", "register_cors_headers"} <= set(rows["anthropic"]["hooks"])


def test_both_appear_in_the_openapi_schema(tiny_model):
    with test_client(tiny_model, plugins="responses,anthropic") as server:
        paths = server.get("/docs/openapi.json").json()["paths"]
    assert {"/v1/responses", "/v1/responses/{response_id}", "/v1/messages", "/v1/messages/count_tokens"} <= set(paths)
    assert "text/event-stream" in paths["/v1/messages"]["post"]["responses"]["200"]["content"]


def test_a_key_without_the_generate_scope_is_refused_in_each_shape(tiny_model, tmp_path):
    keys = tmp_path / "keys.json"
    made = subprocess.run(
        [
            sys.executable,
            "-m",
            "forgellm",
            "keys",
            "add",
            "loader",
            "--scopes",
            "models:load",
            "--api-keys-file",
            str(keys),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert made.returncode == 0, made.stderr
    reader = made.stdout.strip()
    with test_client(tiny_model, plugins="auth,responses,anthropic", api_keys_file=str(keys)) as server:
        refused = server.post("/v1/responses", json=ASK["/v1/responses"], headers={"Authorization": f"Bearer {reader}"})
        assert refused.status_code == 403 and refused.json()["error"]["type"] == "permission_error"
        refused = server.post("/v1/messages", json=ASK["/v1/messages"], headers={"x-api-key": reader})
        assert refused.status_code == 403
        assert refused.json() == {
            "type": "error",
            "error": {"type": "permission_error", "message": "Not allowed to generate"},
        }


def test_metrics_and_the_access_log_count_both_routes(tiny_model, tmp_path):
    log = tmp_path / "access.log"
    with test_client(tiny_model, plugins="responses,anthropic,metrics,logging", access_log_file=str(log)) as server:
        before = scrape(server)
        for path, body in ASK.items():
            assert server.post(path, json=body).status_code == 200
        after = scrape(server)
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    for path in ASK:
        assert value(after, "forgellm_requests_total", route=path, method="POST", status="200") == (
            value(before, "forgellm_requests_total", route=path, method="POST", status="200") + 1
        )
        assert (
            value(after, "forgellm_generated_tokens_total", route=path)
            - value(before, "forgellm_generated_tokens_total", route=path)
            == 3
        )
        [entry] = [entry for entry in entries if entry["path"] == path]
        assert entry["completion_tokens"] == 3 and entry["prompt_tokens"] > 0
