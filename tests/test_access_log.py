"""The logging plugin: one access-log line per request, and no secret or prompt in any log line."""

from __future__ import annotations

import json
import logging
import re
import time

import httpx
import jwt
import pytest
from click.testing import CliRunner

from forgellm.cli import build_cli
from forgellm.testing import ServerProcess, test_client

API_KEY = "fllm_test-key-0123456789-do-not-log"
WRONG_KEY = "fllm_wrong-key-9876543210-do-not-log"
JWT_SECRET = "jwt-secret-0123456789-0123456789-do-not-log"
PROMPT = "the launch code is 0000-PROMPT-DO-NOT-LOG"
AS_KEY = {"Authorization": f"Bearer {API_KEY}"}


def lines_of(path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def entries(path) -> list[dict]:
    return [json.loads(line) for line in lines_of(path)]


@pytest.fixture(scope="module")
def access_log(tmp_path_factory):
    return tmp_path_factory.mktemp("logs") / "access.log"


@pytest.fixture(scope="module")
def logged(tiny_model, access_log):
    with test_client(
        tiny_model, plugins="auth,logging", api_key=(API_KEY,), jwt_secret=JWT_SECRET, access_log_file=str(access_log)
    ) as client:
        yield client


def last_entry(access_log) -> dict:
    return entries(access_log)[-1]


def test_a_generation_is_one_json_line_with_who_what_and_cost(logged, access_log):
    before = len(lines_of(access_log))
    response = logged.post(
        "/api/model/generate", json={"prompt": "hello", "max_tokens": 3}, headers={**AS_KEY, "X-Request-ID": "req-123"}
    )
    assert response.status_code == 200
    assert response.headers["X-Request-ID"] == "req-123"
    assert len(lines_of(access_log)) == before + 1
    entry = last_entry(access_log)
    assert entry["request_id"] == "req-123"
    assert entry["method"] == "POST"
    assert entry["path"] == "/api/model/generate"
    assert entry["status"] == 200
    assert entry["client"] == "testclient"
    assert entry["identity"] == "key:#1"
    assert entry["auth"] == "api_key"
    assert entry["prompt_tokens"] == response.json()["prompt_tokens"]
    assert entry["completion_tokens"] == 3
    assert entry["latency_ms"] > 0
    assert 0 < entry["ttft_ms"] <= entry["latency_ms"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", entry["ts"])


def test_a_request_id_is_made_when_none_or_an_unusable_one_is_sent(logged, access_log):
    made = logged.get("/api/model/status", headers=AS_KEY)
    assert re.fullmatch(r"[0-9a-f]{32}", made.headers["X-Request-ID"])
    assert last_entry(access_log)["request_id"] == made.headers["X-Request-ID"]

    unusable = logged.get("/api/model/status", headers={**AS_KEY, "X-Request-ID": "x" * 200})
    assert re.fullmatch(r"[0-9a-f]{32}", unusable.headers["X-Request-ID"])
    assert last_entry(access_log)["request_id"] == unusable.headers["X-Request-ID"]


def test_a_streamed_generation_is_logged_when_the_stream_ends_with_its_tokens(logged, access_log):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
    with logged.stream("POST", "/v1/chat/completions", json=body, headers=AS_KEY) as response:
        assert response.status_code == 200
        request_id = response.headers["X-Request-ID"]
        response.read()
    entry = last_entry(access_log)
    assert entry["request_id"] == request_id
    assert entry["path"] == "/v1/chat/completions"
    assert entry["completion_tokens"] == 4


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status"),
    [
        ("GET", "/api/model/status", {}, 401),
        ("GET", "/no/such/path", {"headers": AS_KEY}, 404),
        ("POST", "/api/model/generate", {"headers": AS_KEY, "content": b"{not json"}, 400),
        ("GET", "/healthz", {}, 200),
    ],
)
def test_every_request_is_logged_refusals_and_unknown_paths_included(logged, access_log, method, path, kwargs, status):
    response = logged.request(method, path, **kwargs)
    assert response.status_code == status
    entry = last_entry(access_log)
    assert (entry["method"], entry["path"], entry["status"]) == (method, path, status)
    assert entry["request_id"] == response.headers["X-Request-ID"]
    assert entry["prompt_tokens"] is None and entry["completion_tokens"] is None and entry["ttft_ms"] is None


def test_the_log_is_reopened_after_logrotate_moves_it(logged, access_log):
    rotated = access_log.with_name("access.log.1")
    access_log.rename(rotated)
    logged.get("/healthz")
    assert len(lines_of(access_log)) == 1
    assert last_entry(access_log)["path"] == "/healthz"


def test_text_format_is_one_escaped_line_per_request(tiny_model, tmp_path):
    path = tmp_path / "access.log"
    with test_client(plugins="logging", log_format="text", access_log_file=str(path)) as client:
        client.get("/healthz", headers={"X-Request-ID": "abc"})
        client.get('/a%0Aforged 200 line"')
    first, second = lines_of(path)
    assert re.fullmatch(r"\S+ testclient - \"GET /healthz\" 200 [\d.]+ms id=abc tokens=-/-", first)
    assert '"GET /a\\nforged 200 line\\"" 404' in second


def test_an_unknown_log_format_is_a_usage_error():
    result = CliRunner().invoke(build_cli(), ["run", "--plugins", "logging", "--log-format", "xml"])
    assert result.exit_code == 2
    assert "--log-format" in result.output


def secret_free(text: str) -> None:
    for secret in (API_KEY, WRONG_KEY, JWT_SECRET, PROMPT):
        assert secret not in text
    assert not re.search(r"eyJ[\w-]+\.eyJ[\w-]+\.[\w-]+", text), "a JWT reached the log"


def exchanges_with_secrets(request) -> None:
    """Requests carrying every kind of secret: good and bad keys, a JWT, a prompt, a query string."""
    token = jwt.encode({"sub": "svc", "scope": "generate", "exp": int(time.time()) + 60}, JWT_SECRET, "HS256")
    chat = {"messages": [{"role": "system", "content": PROMPT}, {"role": "user", "content": PROMPT}], "max_tokens": 2}
    expected = [
        (request("POST", "/api/model/generate", json={"prompt": PROMPT, "max_tokens": 2}, headers=AS_KEY), 200),
        (request("POST", "/v1/chat/completions", json=chat, headers={"Authorization": f"Bearer {token}"}), 200),
        (
            request(
                "POST", "/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}, headers={"X-API-Key": API_KEY}
            ),
            200,
        ),
        (request("GET", "/api/model/status", headers={"Authorization": f"Bearer {WRONG_KEY}"}), 401),
        (request("GET", "/api/model/status", headers={"X-API-Key": WRONG_KEY}), 401),
        (request("GET", "/api/model/status", headers={"Authorization": f"Bearer {token}x"}), 401),
        (request("GET", f"/api/model/status?api_key={API_KEY}&prompt={PROMPT}", headers=AS_KEY), 200),
        (request("POST", "/api/model/generate", json={"prompt": PROMPT, "max_tokens": "x"}, headers=AS_KEY), 400),
    ]
    assert [response.status_code for response, _ in expected] == [status for _, status in expected]


def test_no_secret_or_prompt_reaches_any_log_record(logged, access_log, caplog):
    caplog.set_level(logging.DEBUG)
    before = len(lines_of(access_log))
    exchanges_with_secrets(logged.request)
    written = lines_of(access_log)[before:]
    assert len(written) == 8
    secret_free("\n".join(written))
    server_side = [record for record in caplog.records if not record.name.startswith(("httpx", "httpcore"))]
    secret_free("\n".join(record.getMessage() for record in server_side))


def test_no_secret_or_prompt_reaches_a_real_server_s_output(tiny_model):
    """Everything a real `forgellm run` prints at debug level: its own logs, uvicorn's, and the access log."""
    env = {"FORGELLM_API_KEYS": API_KEY, "FORGELLM_JWT_SECRET": JWT_SECRET}
    args = ["--model", str(tiny_model), "--plugins", "auth,logging", "--log-level", "debug"]
    with ServerProcess(args, env=env) as server:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            exchanges_with_secrets(client.request)
        _, output = server.stop()
    access_lines = [line for line in output.splitlines() if line.startswith('{"ts"')]
    assert len(access_lines) >= 8, output  # the access log went to stderr
    secret_free(output)
