"""The ratelimit plugin: request and token budgets per client, refused with 429 before anything is generated."""

from __future__ import annotations

import json
import re

import httpx
import pytest
from click.testing import CliRunner
from network_clients import access_log_entry

from forgellm import Identity, hookimpl
from forgellm.cli import build_cli
from forgellm.plugins.auth.keys_file import add_key
from forgellm.testing import ServerProcess, free_port, test_client

GENERATE = "/api/model/generate"


class HeaderIdentity:
    """A stand-in authentication plugin: the subject and its limit claims come from test headers."""

    @hookimpl
    def authenticate(self, request, server):
        subject = request.headers.get("x-test-subject")
        if subject is None:
            return None
        claims = {
            claim: request.headers[header]
            for claim, header in (("rate_limit", "x-test-rate-limit"), ("token_limit", "x-test-token-limit"))
            if header in request.headers
        }
        return Identity(subject, frozenset({"generate"}), "test", claims)


def serve(model=None, **settings):
    return test_client(model, plugins="ratelimit", extra_plugins={"header-identity": HeaderIdentity()}, **settings)


@pytest.fixture(scope="module")
def limited(tiny_model):
    with serve(tiny_model, rate_limit="3/minute", token_limit="40/minute") as client:
        yield client


def as_client(subject: str, **claims: str) -> dict:
    headers = {"X-Test-Subject": subject}
    headers.update({f"X-Test-{name.replace('_', '-').title()}": value for name, value in claims.items()})
    return headers


def generate(client, headers, max_tokens=2, **body):
    return client.post(GENERATE, json={"prompt": "hello", "max_tokens": max_tokens, **body}, headers=headers)


def assert_refused(response, limit: int):
    assert response.status_code == 429
    retry_after = int(response.headers["Retry-After"])
    assert 1 <= retry_after <= 60
    assert response.headers["RateLimit-Limit"] == str(limit)
    assert response.headers["RateLimit-Remaining"] == "0"
    assert response.headers["RateLimit-Reset"] == str(retry_after)
    assert response.headers["RateLimit-Policy"] == f"{limit};w=60"


def test_the_request_after_the_limit_is_a_429_with_retry_headers(limited):
    alice = as_client("alice")
    for _ in range(3):
        assert generate(limited, alice).status_code == 200
    refused = generate(limited, alice)
    assert_refused(refused, 3)
    assert refused.json()["success"] is False
    assert "Too many requests" in refused.json()["error"]
    assert "3 requests per minute" in refused.json()["error"]


def test_openai_routes_spend_the_same_budget_and_refuse_in_openai_shape(limited):
    bob = as_client("bob")
    assert generate(limited, bob).status_code == 200
    assert limited.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}, headers=bob).status_code == 200
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert limited.post("/v1/chat/completions", json=chat, headers=bob).status_code == 200
    refused = limited.post("/v1/chat/completions", json=chat, headers=bob)
    assert_refused(refused, 3)
    error = refused.json()["error"]
    assert error["type"] == "rate_limit_error"
    assert error["code"] == "rate_limit_exceeded"


def test_a_refused_stream_is_a_429_before_any_body(limited):
    carol = as_client("carol")
    for _ in range(3):
        assert generate(limited, carol).status_code == 200
    with limited.stream(
        "POST", GENERATE, json={"prompt": "hi", "max_tokens": 2, "streaming": True}, headers=carol
    ) as r:
        assert r.status_code == 429
        assert r.headers["content-type"].startswith("application/json")
        body = json.loads(r.read())
    assert body["success"] is False
    sse = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True}
    with limited.stream("POST", "/v1/chat/completions", json=sse, headers=carol) as r:
        assert r.status_code == 429
        assert json.loads(r.read())["error"]["type"] == "rate_limit_error"


def test_each_client_has_its_own_budget(limited):
    dave = as_client("dave")
    for _ in range(3):
        assert generate(limited, dave).status_code == 200
    assert generate(limited, dave).status_code == 429
    assert generate(limited, as_client("erin")).status_code == 200
    # No identity: the budget belongs to the client address, apart from every subject's.
    assert generate(limited, {}).status_code == 200


def test_status_polls_model_lists_and_probes_are_not_counted(limited):
    frank = as_client("frank")
    for _ in range(10):
        assert limited.get("/api/model/status", headers=frank).status_code == 200
        assert limited.get("/v1/models", headers=frank).status_code == 200
        assert limited.get("/healthz", headers=frank).status_code == 200
    for _ in range(3):
        assert generate(limited, frank).status_code == 200


def test_rejected_requests_are_not_counted_against_the_budget(limited):
    grace = as_client("grace")
    for _ in range(5):  # refused before before_generate: bad input costs nothing
        assert generate(limited, grace, max_tokens=10**9).status_code == 400
    for _ in range(3):
        assert generate(limited, grace).status_code == 200


def test_the_token_budget_counts_generated_tokens(limited):
    heidi = as_client("heidi")
    first = generate(limited, heidi, max_tokens=30)
    assert first.json()["completion_tokens"] == 30  # the tiny model never stops early
    # 10 tokens of the 40 are left: the request is admitted, and overshooting spends the rest.
    assert generate(limited, heidi, max_tokens=30).status_code == 200
    refused = generate(limited, heidi, max_tokens=1)
    assert_refused(refused, 40)
    assert "Token budget spent" in refused.json()["error"]
    assert "40 tokens per minute" in refused.json()["error"]


def test_streamed_tokens_are_counted_too(limited):
    ivan = as_client("ivan")
    body = {"prompt": "hi", "max_tokens": 40, "streaming": True}
    with limited.stream("POST", GENERATE, json=body, headers=ivan) as r:
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert lines[-1]["type"] == "complete" and lines[-1]["completion_tokens"] == 40
    assert_refused(generate(limited, ivan), 40)


def test_an_identity_claim_overrides_the_server_limits(limited):
    strict = as_client("judy", rate_limit="1/minute")
    assert generate(limited, strict).status_code == 200
    assert_refused(generate(limited, strict), 1)

    frugal = as_client("ken", token_limit="5/minute")
    assert generate(limited, frugal, max_tokens=8).status_code == 200
    assert_refused(generate(limited, frugal), 5)

    generous = as_client("lee", rate_limit="100/minute")
    for _ in range(5):
        assert generate(limited, generous).status_code == 200


def test_an_unreadable_claim_falls_back_to_the_server_limit(limited):
    odd = as_client("mallory", rate_limit="lots")
    for _ in range(3):
        assert generate(limited, odd).status_code == 200
    assert_refused(generate(limited, odd), 3)


def test_keys_from_the_keys_file_carry_their_own_limits(tiny_model, tmp_path):
    keys_file = tmp_path / "keys.json"
    strict = add_key(keys_file, "strict", ("generate",), rate_limit="1/minute")
    plain = add_key(keys_file, "plain", ("generate",))
    with test_client(
        tiny_model, plugins="auth,ratelimit", api_keys_file=str(keys_file), rate_limit="2/minute"
    ) as client:
        as_strict = {"Authorization": f"Bearer {strict}"}
        assert generate(client, as_strict).status_code == 200
        assert_refused(generate(client, as_strict), 1)
        as_plain = {"X-API-Key": plain}
        assert generate(client, as_plain).status_code == 200
        assert generate(client, as_plain).status_code == 200
        assert_refused(generate(client, as_plain), 2)


def test_a_stream_the_client_abandons_is_charged_for_what_was_generated(tiny_model, tmp_path):
    access_log = tmp_path / "access.log"
    args = ["--model", str(tiny_model), "--plugins", "ratelimit,logging", "--token-limit", "1000/day",
            "--access-log-file", str(access_log)]  # fmt: skip
    with ServerProcess(args) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        body = {"prompt": "hello", "max_tokens": 4000, "streaming": True}
        with client.stream("POST", GENERATE, json=body, headers={"X-Request-ID": "abandoned"}) as response:
            for _ in zip(range(31), response.iter_lines(), strict=False):  # each chunk line holds at least one token
                pass
        # The connection is closed: the server stops the generation, charges it, then logs it.
        charged = access_log_entry(access_log, "abandoned")["completion_tokens"]
        assert 30 <= charged < 1000
        rest = client.post(GENERATE, json={"prompt": "hello", "max_tokens": 4000})
        assert rest.status_code == 200
        assert rest.json()["completion_tokens"] == 1000 - charged  # what the abandoned stream left, no more
        assert rest.json()["finish_reason"] == "length"
        refused = client.post(GENERATE, json={"prompt": "hello", "max_tokens": 1})
    assert refused.status_code == 429
    assert "Token budget spent" in refused.json()["error"]


def test_a_printed_configuration_masks_the_storage_url():
    args = [
        "run",
        "--plugins",
        "ratelimit",
        "--rate-limit-storage",
        "redis://:hunter2@redis.internal:6379/0",
        "--print-config",
    ]
    printed = CliRunner().invoke(build_cli(), args)
    assert printed.exit_code == 0
    assert "hunter2" not in printed.output
    assert 'rate_limit_storage = "***"' in printed.output


def test_a_malformed_limit_is_a_usage_error():
    result = CliRunner().invoke(build_cli(), ["run", "--plugins", "ratelimit", "--rate-limit", "60/fortnight"])
    assert result.exit_code == 2
    assert "--rate-limit" in result.output and "not a rate such as 60/minute" in result.output


def startup_failure(exception: type[Exception], match: str):
    """The error a startup hook raised, as the test client reports it: inside an exception group."""
    return pytest.RaisesGroup(pytest.RaisesExc(exception, match=match), flatten_subgroups=True)


def test_an_unreachable_storage_stops_the_server_at_startup():
    with startup_failure(RuntimeError, "rate-limit storage redis://127.0.0.1:\\d+ is unreachable"):
        with serve(rate_limit="3/minute", rate_limit_storage=f"redis://127.0.0.1:{free_port()}"):
            pass


def test_an_unknown_storage_is_named_at_startup_without_its_password():
    message = "--rate-limit-storage nosuch://:***@x: unknown storage scheme : nosuch://:***@x"
    with startup_failure(ValueError, re.escape(message) + "$"):
        with serve(rate_limit="3/minute", rate_limit_storage="nosuch://:password@x"):
            pass
