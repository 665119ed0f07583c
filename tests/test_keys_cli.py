"""``forgellm keys add | list | revoke`` and a server that follows the keys file without a restart."""

from __future__ import annotations

import json
import os
import stat
import threading

import pytest
from click.testing import CliRunner

from forgellm.cli import build_cli
from forgellm.plugins.auth.authenticator import AuthConfigError
from forgellm.plugins.auth.keys_file import add_key
from forgellm.testing import test_client

STATIC_KEY = "static-key-for-keys-tests-012345"


@pytest.fixture(autouse=True)
def private_config_home(tmp_path, monkeypatch):
    """Each test gets its own default keys file location, away from the developer's ~/.config."""
    config_home = tmp_path / "config-home"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(config_home))
    monkeypatch.delenv("FORGELLM_API_KEYS_FILE", raising=False)
    return config_home


@pytest.fixture(scope="module")
def cli():
    return build_cli()


@pytest.fixture
def keys_path(tmp_path):
    return tmp_path / "keys" / "keys.json"


def keys(cli, *args, env=None):
    """Run ``forgellm keys ...``; the result's stdout and stderr are kept apart."""
    return CliRunner().invoke(cli, ["keys", *args], env=env, catch_exceptions=False)


def add(cli, path, name, *options) -> str:
    result = keys(cli, "add", name, "--api-keys-file", str(path), *options)
    assert result.exit_code == 0, result.output
    return result.stdout.strip()


def status_code(client, key) -> int:
    return client.get("/api/model/status", headers={"Authorization": f"Bearer {key}"}).status_code


def test_add_prints_the_key_once_and_stores_only_its_digest(cli, keys_path):
    result = keys(cli, "add", "ci", "--api-keys-file", str(keys_path))

    assert result.exit_code == 0
    key = result.stdout.strip()
    assert result.stdout == key + "\n"  # the key alone: KEY=$(forgellm keys add ci) works
    assert key.startswith("fllm_") and len(key) >= 40
    assert "cannot be shown again" in result.stderr and key not in result.stderr
    stored = keys_path.read_text()
    assert key not in stored
    record = json.loads(stored)["keys"][0]
    assert record["name"] == "ci" and record["scopes"] == ["generate"]
    assert record["digest"].startswith("sha256:")


def test_the_keys_file_is_private_to_its_owner(cli, keys_path):
    add(cli, keys_path, "ci")
    add(cli, keys_path, "second")  # a rewrite keeps the mode

    assert stat.S_IMODE(keys_path.stat().st_mode) == 0o600
    assert not any(keys_path.parent.glob("*.tmp"))  # the atomic write left nothing behind


@pytest.mark.skipif(os.geteuid() != 0, reason="only root may give a file to another user")
def test_root_rewriting_a_service_users_keys_file_keeps_its_owner(cli, keys_path):
    add(cli, keys_path, "ci")
    service_user = (4321, 4321)
    os.chown(keys_path, *service_user)
    add(cli, keys_path, "second")

    written = keys_path.stat()
    assert (written.st_uid, written.st_gid) == service_user
    assert stat.S_IMODE(written.st_mode) == 0o600


def test_list_shows_names_scopes_and_limits_but_never_keys_or_digests(cli, keys_path):
    first = add(cli, keys_path, "ci", "--scopes", "generate,models:load", "--rate-limit", "10/second;300/hour")
    second = add(cli, keys_path, "ops", "--scopes", "admin", "--token-limit", "20000/hour")
    digests = [record["digest"] for record in json.loads(keys_path.read_text())["keys"]]

    table = keys(cli, "list", "--api-keys-file", str(keys_path))
    as_json = keys(cli, "list", "--json", "--api-keys-file", str(keys_path))

    assert table.exit_code == as_json.exit_code == 0
    assert "ci  scopes: generate,models:load" in table.stdout and "rate_limit=10/second;300/hour" in table.stdout
    assert "ops  scopes: admin" in table.stdout and "token_limit=20000/hour" in table.stdout
    rows = json.loads(as_json.stdout)
    assert [(row["name"], row["scopes"], row["rate_limit"], row["token_limit"]) for row in rows] == [
        ("ci", ["generate", "models:load"], "10/second;300/hour", None),
        ("ops", ["admin"], None, "20000/hour"),
    ]
    for secret in (first, second, *digests, *(digest.split(":")[1] for digest in digests)):
        assert secret not in table.output and secret not in as_json.output


def test_add_list_revoke_round_trip_against_a_running_server(cli, keys_path):
    """Keys added and revoked while the server runs take effect at its next request."""
    ci_key = add(cli, keys_path, "ci")
    with test_client(plugins="auth", api_keys_file=str(keys_path)) as server:
        generate = server.post("/api/model/generate", json={"prompt": "Hi"}, headers={"X-API-Key": ci_key})
        load = server.post("/api/model/load", json={"model_name": "/nowhere/m"}, headers={"X-API-Key": ci_key})
        assert status_code(server, ci_key) == 200
        assert generate.status_code == 400 and generate.json()["error"] == "No model loaded"  # past the guard
        assert load.status_code == 403  # "generate" is the default scope

        ops_key = add(cli, keys_path, "ops", "--scopes", "models:load")
        assert status_code(server, ops_key) == 200
        assert (
            server.post(
                "/api/model/load", json={"model_name": "/nowhere/m"}, headers={"X-API-Key": ops_key}
            ).status_code
            == 400
        )

        revoked = keys(cli, "revoke", "ci", "--api-keys-file", str(keys_path))
        assert revoked.exit_code == 0 and "Revoked key 'ci'" in revoked.stderr
        refused = server.get("/api/model/status", headers={"X-API-Key": ci_key})
        assert refused.status_code == 401 and refused.json()["error"] == "Invalid API key or token"
        assert status_code(server, ops_key) == 200

    listed = keys(cli, "list", "--json", "--api-keys-file", str(keys_path))
    assert [row["name"] for row in json.loads(listed.stdout)] == ["ops"]


def test_the_default_keys_file_is_used_by_the_commands_and_the_server(cli, private_config_home):
    result = keys(cli, "add", "ci")
    key = result.stdout.strip()

    assert (private_config_home / "forgellm" / "keys.json").is_file()
    with test_client(plugins="auth") as server:  # no --api-keys-file: the default one exists
        assert status_code(server, key) == 200
        assert status_code(server, "fllm_wrong") == 401


def test_the_keys_file_can_come_from_the_environment(cli, keys_path):
    env = {"FORGELLM_API_KEYS_FILE": str(keys_path)}
    keys(cli, "add", "ci", env=env)

    listed = keys(cli, "list", "--json", env=env)
    assert [row["name"] for row in json.loads(listed.stdout)] == ["ci"]
    assert keys_path.is_file()


@pytest.mark.parametrize(
    "arguments, exit_code, message",
    [
        (["add", "ci", "--scopes", "generate,root"], 2, "unknown scope root"),
        (["add", "ci", "--scopes", ""], 2, "give at least one scope"),
        (["add", "ci", "--rate-limit", "lots"], 2, "not a limit like 10/minute"),
        (["add", "ci", "--token-limit", "10/fortnight"], 2, "not a limit like 10/minute"),
        (["add", "no spaces"], 1, "invalid key name"),
        (["add", "-dash-first"], 2, "No such option"),
        (["revoke", "nobody"], 1, "no key named 'nobody'"),
    ],
    ids=[
        "unknown-scope",
        "no-scope",
        "bad-rate-limit",
        "bad-token-limit",
        "bad-name",
        "option-like-name",
        "revoke-unknown",
    ],
)
def test_bad_commands_fail_with_a_clear_message(cli, keys_path, arguments, exit_code, message):
    result = keys(cli, *arguments, "--api-keys-file", str(keys_path))

    assert result.exit_code == exit_code
    assert message in result.output
    assert not keys_path.exists() or json.loads(keys_path.read_text())["keys"] == []


def test_an_unusable_keys_file_location_is_a_clear_error(cli, tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    result = keys(cli, "add", "ci", "--api-keys-file", str(blocker / "keys.json"))

    assert result.exit_code == 1
    assert result.output.startswith(f"Error: cannot use {blocker}")  # one line, no traceback


def test_a_name_is_used_once(cli, keys_path):
    add(cli, keys_path, "ci")
    again = keys(cli, "add", "ci", "--api-keys-file", str(keys_path))

    assert again.exit_code == 1 and "already exists" in again.output
    assert len(json.loads(keys_path.read_text())["keys"]) == 1


def test_concurrent_adds_lose_no_key(keys_path):
    names = [f"worker-{number}" for number in range(8)]
    threads = [threading.Thread(target=add_key, args=(keys_path, name, ("generate",))) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(record["name"] for record in json.loads(keys_path.read_text())["keys"]) == names


def test_a_broken_or_missing_keys_file_refuses_its_keys_until_fixed(cli, keys_path, caplog):
    key = add(cli, keys_path, "ci")
    good = keys_path.read_text()
    with test_client(plugins="auth", api_keys_file=str(keys_path), api_key=(STATIC_KEY,)) as server:
        keys_path.write_text("{ not json")
        assert status_code(server, key) == 401  # fail closed
        assert status_code(server, STATIC_KEY) == 200  # keys from --api-key are unaffected

        keys_path.write_text(good)
        assert status_code(server, key) == 200

        keys_path.unlink()
        assert status_code(server, key) == 401

    assert "is not valid" in caplog.text and "is gone" in caplog.text
    assert key not in caplog.text


def test_a_named_keys_file_must_exist_when_the_server_starts(tmp_path):
    with pytest.raises(BaseExceptionGroup) as info:
        with test_client(plugins="auth", api_keys_file=str(tmp_path / "missing.json")):
            pass
    assert info.group_contains(AuthConfigError, match="does not exist; create it with `forgellm keys add`")


def test_an_invalid_keys_file_stops_the_server(keys_path):
    keys_path.parent.mkdir(parents=True)
    keys_path.write_text(json.dumps({"version": 1, "keys": [{"name": "ci", "scopes": ["generate"]}]}))
    with pytest.raises(BaseExceptionGroup) as info:
        with test_client(plugins="auth", api_keys_file=str(keys_path)):
            pass
    assert info.group_contains(AuthConfigError, match="has no sha256 digest")
