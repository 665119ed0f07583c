"""Configuration: a TOML file, FORGELLM_* variables and flags, in that order of strength.

Driven through the real command line (`forgellm run --print-config`), which prints the very
Settings object `forgellm run` would serve with.
"""

from __future__ import annotations

import os
import tomllib

import pytest
from click.testing import CliRunner

from forgellm.cli import build_cli


@pytest.fixture(scope="module")
def cli():
    return build_cli()


@pytest.fixture(autouse=True)
def no_outside_settings(monkeypatch):
    for name in list(os.environ):
        if name.startswith("FORGELLM_"):
            monkeypatch.delenv(name)


def run(cli, *args, env=None):
    """`forgellm run ARGS --print-config`: never starts a server, even when a check regresses."""
    return CliRunner().invoke(cli, ["run", *args, "--print-config"], env=env, catch_exceptions=False)


def effective(cli, *args, env=None) -> dict:
    result = run(cli, *args, env=env)
    assert result.exit_code == 0, result.output
    return tomllib.loads(result.output)


@pytest.fixture
def write_config(tmp_path):
    def write(text: str):
        path = tmp_path / "forgellm.toml"
        path.write_text(text)
        return str(path)

    return write


def test_defaults_without_a_file(cli):
    config = effective(cli)
    assert config["port"] == 5001
    assert config["max_queue"] == 256
    assert config["request_timeout"] == 600.0
    assert {"auth", "ratelimit", "logging"} <= set(config)  # a table per plugin with options, even when unset


def test_the_file_sets_core_options_and_each_plugin_table(cli, write_config):
    path = write_config(
        'port = 8080\nplugins = "auth,metrics"\nallow_model = ["models/*"]\n'
        "[auth]\njwt_leeway = 5\n"
        '[ratelimit]\nrate_limit = "10/second"\n'
    )
    config = effective(cli, "--config", path)
    assert config["port"] == 8080
    assert config["plugins"] == "auth,metrics"
    assert config["allow_model"] == ["models/*"]
    assert config["auth"]["jwt_leeway"] == 5.0
    assert config["ratelimit"]["rate_limit"] == "10/second"


def test_core_options_may_sit_in_a_server_table_and_keys_may_use_dashes(cli, write_config):
    path = write_config('[server]\nmax-queue = 7\nlog-level = "debug"\n')
    config = effective(cli, "--config", path)
    assert config["max_queue"] == 7
    assert config["log_level"] == "debug"


def test_flags_beat_environment_beats_file_beats_defaults(cli, write_config):
    path = write_config('port = 8080\nmax_queue = 7\nmax_concurrency = 3\n[ratelimit]\nrate_limit = "1/second"\n')
    env = {"FORGELLM_PORT": "9000", "FORGELLM_MAX_QUEUE": "8", "FORGELLM_RATE_LIMIT": "2/second"}
    config = effective(cli, "--config", path, "--port", "9100", env=env)
    assert config["port"] == 9100  # flag over environment and file
    assert config["max_queue"] == 8  # environment over file
    assert config["max_concurrency"] == 3  # file over default
    assert config["max_tokens_cap"] == 4096  # default
    assert config["ratelimit"]["rate_limit"] == "2/second"  # a plugin's option, same order


def test_repeatable_options_follow_the_same_order(cli, write_config):
    path = write_config('cors_origin = ["https://a.example", "https://b.example"]\n')
    assert effective(cli, "--config", path)["cors_origin"] == ["https://a.example", "https://b.example"]
    from_env = effective(cli, "--config", path, env={"FORGELLM_CORS_ORIGIN": "https://c.example"})
    assert from_env["cors_origin"] == ["https://c.example"]
    from_flag = effective(cli, "--config", path, "--cors-origin", "https://d.example")
    assert from_flag["cors_origin"] == ["https://d.example"]


def test_the_config_file_can_come_from_the_environment(cli, write_config):
    path = write_config("max_queue = 11\n")
    assert effective(cli, env={"FORGELLM_CONFIG": path})["max_queue"] == 11


def test_secrets_are_masked(cli, write_config):
    path = write_config('[auth]\napi_key = ["key-from-file-0123456789"]\n')
    result = run(cli, "--config", path, "--jwt-secret", "jwt-secret-from-flag-0123456789abcdef")
    assert result.exit_code == 0, result.output
    assert "key-from-file" not in result.output
    assert "jwt-secret-from-flag" not in result.output
    config = tomllib.loads(result.output)
    assert config["auth"]["api_key"] == "***"
    assert config["auth"]["jwt_secret"] == "***"


def test_unset_options_are_named(cli):
    result = run(cli)
    unset = next(line for line in result.output.splitlines() if line.startswith("# Unset:"))
    assert "memory_budget" in unset and "jwt_secret" in unset
    assert "model = []" in result.output.splitlines()  # a list option is printed empty, not unset


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('port = "abc"\n', "port at the top level (--port) must be an integer, not a string ('abc')"),
        ("port = 80.5\n", "port at the top level (--port) must be an integer, not a float (80.5)"),
        ("max_queue = true\n", "max_queue at the top level (--max-queue) must be an integer, not a boolean"),
        ('request_timeout = "soon"\n', "request_timeout at the top level (--request-timeout) must be a number"),
        ('log_level = "loud"\n', "log_level at the top level (--log-level) is invalid: 'loud' is not one of"),
        ('cors_origin = "https://a.example"\n', "cors_origin at the top level (--cors-origin) must be a list"),
        ("max_queu = 3\n", "unknown option 'max_queu' at the top level (did you mean 'max_queue'?)"),
        ("[auth]\nport = 1\n", "port belongs in the [server] table, not in [auth]"),
        ("jwt_leeway = 1\n", "jwt_leeway belongs in the [auth] table, not at the top level"),
        ("[auth]\njwt_leway = 1\n", "unknown option 'jwt_leway' in [auth] (did you mean 'jwt_leeway'?)"),
        ("[authh]\njwt_leeway = 1\n", "unknown table [authh] (did you mean 'auth'?)"),
        (
            '[ratelimit]\nrate_limit = "lots"\n',
            "rate_limit in [ratelimit] (--rate-limit) is invalid: 'lots' is not a rate",
        ),
        ("port = 1\n[server]\nport = 2\n", "port is set twice"),
        ("port = \n", "not valid TOML"),
    ],
)
def test_a_bad_file_fails_at_start_naming_the_option(cli, write_config, text, message):
    path = write_config(text)
    result = run(cli, "--config", path)
    assert result.exit_code == 2
    assert "Invalid value for '--config'" in result.output
    assert f"{path}: " in result.output
    assert message in result.output


def test_a_missing_file_fails_at_start(cli, tmp_path):
    result = run(cli, "--config", str(tmp_path / "absent.toml"))
    assert result.exit_code == 2
    assert "does not exist" in result.output


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"FORGELLM_MAX_QUEUE": "many"}, "Invalid value for '--max-queue' (env var: 'FORGELLM_MAX_QUEUE')"),
        ({"FORGELLM_LOG_LEVEL": "loud"}, "Invalid value for '--log-level' (env var: 'FORGELLM_LOG_LEVEL')"),
        ({"FORGELLM_RATE_LIMIT": "lots"}, "Invalid value for '--rate-limit' (env var: 'FORGELLM_RATE_LIMIT')"),
    ],
)
def test_a_bad_environment_value_fails_at_start_naming_the_option(cli, env, message):
    result = run(cli, env=env)
    assert result.exit_code == 2
    assert message in result.output


def test_a_bad_flag_fails_at_start_naming_the_option(cli):
    result = run(cli, "--port", "eighty")
    assert result.exit_code == 2
    assert "Invalid value for '--port'" in result.output
