"""The auth plugin over HTTP: API keys in either header, 401s in both error shapes, scopes, and fuzzing.

JWTs are tested in test_jwt.py and the ``forgellm keys`` commands in test_keys_cli.py.
"""

from __future__ import annotations

import base64
import json
import logging
import time

import httpx
import jwt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from identity_probe import IdentityProbe
from litestar.routes import HTTPRoute
from wire import bearer

from forgellm.plugins.auth.keys_file import add_key
from forgellm.testing import ServerProcess, test_client

STATIC_KEY = "static-key-for-tests-0123456789"
JWT_SECRET = "a-jwt-secret-of-at-least-32-bytes-0123456789"
CHALLENGE = 'Bearer realm="forgellm"'
GENERATE_BODY = {"prompt": "Hello", "max_tokens": 2}


@pytest.fixture(scope="module")
def file_keys(tmp_path_factory):
    """A keys file with one key per scope, as `forgellm keys add` writes it."""
    path = tmp_path_factory.mktemp("keys") / "keys.json"
    keys = {
        "generator": add_key(path, "generator", ("generate",), rate_limit="5/minute", token_limit="1000/hour"),
        "loader": add_key(path, "loader", ("models:load",)),
        "admin": add_key(path, "admin", ("admin",)),
    }
    return path, keys


@pytest.fixture(scope="module")
def probe():
    return IdentityProbe()


@pytest.fixture(scope="module")
def server(tiny_model, file_keys, probe):
    """The tiny model behind the auth plugin: a static key, the keys file, and JWT (so JWT-shaped input is verified)."""
    path, _ = file_keys
    with test_client(
        tiny_model,
        headers={"X-API-Key": STATIC_KEY},  # to wait for the model to load
        plugins="auth",
        api_key=(STATIC_KEY,),
        api_keys_file=str(path),
        jwt_secret=JWT_SECRET,
        extra_plugins={"identity-probe": probe},
    ) as client:
        del client.headers["X-API-Key"]
        yield client


@pytest.fixture(scope="module")
def chat_body(tiny_model):
    return {"model": str(tiny_model), "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def assert_unauthorized(response, openai: bool = False) -> str:
    """A 401 with the challenge, in the envelope (or OpenAI's shape under /v1); returns the message."""
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == CHALLENGE
    body = response.json()
    if openai:
        assert body["error"]["type"] == "authentication_error"
        assert body["error"]["code"] == "invalid_api_key"
        return body["error"]["message"]
    assert body["success"] is False
    return body["error"]


@pytest.mark.parametrize("send", [bearer, lambda key: {"X-API-Key": key}], ids=["authorization-bearer", "x-api-key"])
def test_a_static_key_is_accepted_in_either_header(server, send):
    status = server.get("/api/model/status", headers=send(STATIC_KEY))
    models = server.get("/v1/models", headers=send(STATIC_KEY))
    generated = server.post("/api/model/generate", json=GENERATE_BODY, headers=send(STATIC_KEY))

    assert status.status_code == 200 and status.json()["loaded"] is True
    assert models.status_code == 200
    assert generated.status_code == 200 and generated.json()["completion_tokens"] == 2


def test_bearer_scheme_is_case_insensitive(server):
    assert server.get("/api/model/status", headers={"Authorization": f"bearer {STATIC_KEY}"}).status_code == 200


def test_missing_credentials_are_a_401_in_the_envelope(server):
    message = assert_unauthorized(server.get("/api/model/status"))
    assert "Missing credentials" in message


def test_missing_credentials_are_a_401_in_openai_shape_under_v1(server, chat_body):
    message = assert_unauthorized(server.post("/v1/chat/completions", json=chat_body), openai=True)
    assert "Missing credentials" in message


@pytest.mark.parametrize(
    "headers",
    [
        bearer("wrong-key"),
        {"X-API-Key": "wrong-key"},
        bearer(STATIC_KEY + "x"),
        bearer(STATIC_KEY[:-1]),
        {"X-API-Key": STATIC_KEY.upper()},
    ],
    ids=["bearer", "x-api-key", "longer", "shorter", "other-case"],
)
def test_a_wrong_key_is_a_401_in_both_shapes(server, headers):
    envelope_message = assert_unauthorized(server.post("/api/model/generate", json=GENERATE_BODY, headers=headers))
    openai_message = assert_unauthorized(
        server.post("/v1/completions", json={"prompt": "Hi"}, headers=headers), openai=True
    )
    assert envelope_message == openai_message == "Invalid API key or token"


@pytest.mark.parametrize(
    "headers, reason",
    [
        ({"Authorization": f"Basic {base64.b64encode(b'user:pass').decode()}"}, "Unsupported authorization scheme"),
        ({"Authorization": "Bearer"}, "empty"),
        ({"Authorization": "Bearer    "}, "empty"),
        ({"X-API-Key": ""}, "empty"),
        ({"Authorization": f"Bearer {STATIC_KEY}", "X-API-Key": STATIC_KEY}, "not both"),
    ],
    ids=["basic", "bearer-without-value", "bearer-blank", "empty-x-api-key", "both-headers"],
)
def test_malformed_credentials_are_a_401_that_says_why(server, headers, reason):
    assert reason in assert_unauthorized(server.get("/api/model/status", headers=headers))


def test_a_repeated_credential_header_is_a_401(server):
    # Whether the two values arrive as two headers or folded into one ("a, b"), neither is trusted.
    headers = [("Authorization", f"Bearer {STATIC_KEY}"), ("Authorization", "Bearer other")]
    assert_unauthorized(server.get("/api/model/status", headers=headers))


def _example_path(path: str) -> str:
    return path.replace("{path:str}", "swagger")


def test_every_route_needs_credentials_except_the_health_probes(server):
    public, protected = set(), set()
    for route in server.app.routes:
        if not isinstance(route, HTTPRoute):
            continue
        for handler in route.route_handlers:
            for method in handler.http_methods - {"OPTIONS", "HEAD"}:
                response = server.request(method, _example_path(route.path))
                (protected if response.status_code == 401 else public).add(route.path)

    # The console's page and assets hold no secret (tests/test_console.py checks); what they show needs credentials.
    assert public == {"/healthz", "/readyz", "/", "/console", "/console/assets/{name:str}"}
    assert "/console/api/state" in protected
    assert {"/api/model/status", "/api/model/load", "/api/model/unload", "/api/model/generate"} <= protected
    assert {"/v1/models", "/v1/completions", "/v1/chat/completions", "/docs", "/docs/openapi.json"} <= protected


def test_the_openapi_schema_is_served_to_an_authenticated_client(server):
    response = server.get("/docs/openapi.json", headers=bearer(STATIC_KEY))
    assert response.status_code == 200
    assert "/api/model/generate" in response.json()["paths"]


def test_health_probes_answer_without_credentials(server):
    assert server.get("/healthz").json() == {"status": "ok"}
    assert server.get("/readyz").json()["ready"] is True


def test_a_generate_key_generates_but_cannot_load(server, file_keys, chat_body):
    _, keys = file_keys
    headers = bearer(keys["generator"])

    assert server.post("/api/model/generate", json=GENERATE_BODY, headers=headers).status_code == 200
    assert server.post("/v1/chat/completions", json=chat_body, headers=headers).status_code == 200
    assert server.get("/api/model/status", headers=headers).status_code == 200
    refused = server.post("/api/model/load", json={"model_name": "/nowhere"}, headers=headers)
    unload_refused = server.post("/api/model/unload", headers=headers)

    for response in (refused, unload_refused):
        assert response.status_code == 403
        assert response.json() == {"success": False, "error": "Not allowed to load"}
        assert "www-authenticate" not in response.headers


def test_a_load_key_loads_but_cannot_generate(server, file_keys, chat_body):
    _, keys = file_keys
    headers = {"X-API-Key": keys["loader"]}

    # Past the guard: the load is refused for its path, not for its credentials.
    load = server.post("/api/model/load", json={"model_name": "/nowhere/model"}, headers=headers)
    guide = server.post("/api/model/generate", json=GENERATE_BODY, headers=headers)
    openai = server.post("/v1/chat/completions", json=chat_body, headers=headers)

    assert load.status_code == 400 and "was not found or is not loadable" in load.json()["error"]
    assert guide.status_code == 403 and guide.json() == {"success": False, "error": "Not allowed to generate"}
    assert openai.status_code == 403
    assert openai.json()["error"]["type"] == "permission_error"
    assert openai.json()["error"]["code"] == "insufficient_scope"


def test_an_admin_key_may_do_everything(server, file_keys):
    _, keys = file_keys
    headers = bearer(keys["admin"])

    assert server.post("/api/model/generate", json=GENERATE_BODY, headers=headers).status_code == 200
    assert server.post("/api/model/load", json={"model_name": "/nowhere/model"}, headers=headers).status_code == 400


def test_identities_name_the_key_never_hold_it(server, file_keys, probe):
    _, keys = file_keys
    server.get("/api/model/status", headers=bearer(STATIC_KEY))
    static = probe.identities[-1]
    server.get("/api/model/status", headers={"X-API-Key": keys["generator"]})
    named = probe.identities[-1]

    assert (static.subject, static.method) == ("key:#1", "api_key")
    assert static.scopes == {"generate", "models:load", "admin"}
    assert (named.subject, named.method, named.scopes) == ("key:generator", "api_key", {"generate"})
    # The ratelimit plugin reads a key's own limits from here.
    assert named.claims["rate_limit"] == "5/minute"
    assert named.claims["token_limit"] == "1000/hour"
    for identity in (static, named):
        text = repr(identity)
        assert STATIC_KEY not in text and keys["generator"] not in text


def test_no_key_reaches_the_logs(server, file_keys, caplog):
    _, keys = file_keys
    with caplog.at_level(logging.DEBUG):
        server.get("/api/model/status", headers=bearer(STATIC_KEY))
        server.get("/api/model/status", headers={"X-API-Key": keys["admin"]})
        server.get("/api/model/status", headers=bearer("a-wrong-key-that-must-not-be-logged"))

    logged = caplog.text
    for secret in (STATIC_KEY, keys["admin"], "a-wrong-key-that-must-not-be-logged", JWT_SECRET):
        assert secret not in logged


# Header values a client could send: any bytes but CR, LF and NUL (which HTTP servers reject before the app).
header_bytes = st.binary(max_size=300).map(lambda value: value.translate(None, b"\r\n\x00"))
base64url = st.binary(max_size=120).map(lambda value: base64.urlsafe_b64encode(value).rstrip(b"=").decode())
json_segment = st.dictionaries(
    st.sampled_from(["alg", "typ", "kid", "sub", "exp", "aud", "iss", "scope", "nbf", "crit", "b64"]),
    st.one_of(
        st.sampled_from(["none", "None", "HS256", "HS512", "RS256", "ES256", "EdDSA", "", "key:#1"]),
        st.integers(),
        st.floats(allow_nan=False),
        st.booleans(),
        st.none(),
        st.lists(st.text(max_size=5), max_size=3),
    ),
    max_size=6,
).map(lambda claims: base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode())
jwt_shaped = st.tuples(st.one_of(json_segment, base64url), st.one_of(json_segment, base64url), base64url).map(".".join)
bearer_values = st.one_of(
    header_bytes,
    st.one_of(header_bytes, jwt_shaped.map(str.encode)).map(lambda value: b"Bearer " + value),
    st.tuples(st.sampled_from([b"Bearer", b"bearer", b"BEARER", b"Basic", b"Token", b""]), header_bytes).map(b" ".join),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(authorization=bearer_values, api_key=st.one_of(st.none(), header_bytes))
def test_fuzzed_credential_headers_are_always_a_clean_401(server, authorization, api_key):
    headers = [(b"authorization", authorization)]
    if api_key is not None:
        headers.append((b"x-api-key", api_key))
    for path, openai in (("/api/model/status", False), ("/v1/models", True)):
        response = server.get(path, headers=headers)
        assert_unauthorized(response, openai=openai)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(api_key=header_bytes)
def test_fuzzed_x_api_key_is_always_a_clean_401(server, api_key):
    assert_unauthorized(server.post("/api/model/generate", json=GENERATE_BODY, headers=[(b"x-api-key", api_key)]))


def test_settings_from_flags_and_environment_work_in_a_real_server(tiny_model, tmp_path):
    """FORGELLM_API_KEYS is comma-separated and adds to repeated --api-key flags; the JWT secret and
    the keys file come from the environment too; FORGELLM_PLUGINS enables auth."""
    keys_file = tmp_path / "keys.json"
    file_key = add_key(keys_file, "from-file", ("generate",))
    env = {
        "FORGELLM_PLUGINS": "auth",
        "FORGELLM_API_KEYS": "env-key-one, env-key-two",
        "FORGELLM_JWT_SECRET": JWT_SECRET,
        "FORGELLM_API_KEYS_FILE": str(keys_file),
    }
    args = ["--model", str(tiny_model), "--api-key", "flag-key-one", "--api-key", "flag-key-two"]
    token = jwt.encode({"sub": "carol", "exp": int(time.time()) + 600}, JWT_SECRET, algorithm="HS256")
    static = ("env-key-one", "env-key-two", "flag-key-one", "flag-key-two")
    with ServerProcess(args, env=env) as process:  # ready once /readyz (public) answers 200
        accepted = {
            credential: httpx.get(process.url + "/api/model/status", headers=bearer(credential)).status_code
            for credential in (*static, file_key, token)
        }
        wrong = httpx.get(process.url + "/v1/models", headers={"X-API-Key": "env-key-one,env-key-two"})
        missing = httpx.get(process.url + "/api/model/status")
        # A real server keeps repeated headers apart (the in-process client folds them).
        repeated = httpx.get(
            process.url + "/api/model/status",
            headers=[("Authorization", "Bearer env-key-one"), ("Authorization", "Bearer env-key-two")],
        )
        _, output = process.stop()

    assert accepted == dict.fromkeys(accepted, 200)
    assert_unauthorized(wrong, openai=True)
    assert_unauthorized(missing)
    assert "Send one authorization header" in assert_unauthorized(repeated)
    assert "auth: accepting 4 API keys" in output and "1 from keys file" in output and "JWT (HS256)" in output
    for secret in (*static, file_key, token, JWT_SECRET):
        assert secret not in output


def test_the_server_refuses_to_start_with_auth_on_and_no_credentials():
    with pytest.raises(RuntimeError, match="no credentials are configured"):
        with ServerProcess(["--plugins", "auth"], wait_ready=False):
            pass
