"""The OpenAPI schema at /docs/openapi.json: served, valid OpenAPI 3.1, complete, and true.

"True" is checked against real responses: each one is validated (jsonschema) against the
schema its route declares for that status and media type, streams line by line.
"""

from __future__ import annotations

import json

import httpx
import pytest
from litestar.routes import HTTPRoute
from openapi_spec_validator import validate as validate_openapi

from forgellm.testing import test_client, wait_until_loaded
from forgellm.testing.schema_check import ResponseSchemaCheck, media_type

GENERATE = "/api/model/generate"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


@pytest.fixture(scope="module")
def served(tiny_model):
    with test_client(tiny_model, plugins="metrics", max_body_size=64 * 1024) as client:
        yield client


@pytest.fixture(scope="module")
def spec(served):
    response = served.get("/docs/openapi.json")
    assert response.status_code == 200
    return response.json()


def conforms(spec: dict, method: str, path: str, response) -> None:
    """The response's status and media type are declared for the route, and every item fits the schema."""
    check = ResponseSchemaCheck(spec)
    assert check.declared(method, path, response) is not None, (
        f"{method} {path} does not declare {response.status_code} {media_type(response)}"
    )
    check.check(method, path, response)


def test_a_key_the_schema_does_not_declare_fails_the_check(served, spec):
    check = ResponseSchemaCheck(spec)
    plain = served.post(GENERATE, json={"prompt": "hi", "max_tokens": 2})
    drifted = httpx.Response(200, json={**plain.json(), "surprise": 1}, request=plain.request)
    with pytest.raises(AssertionError, match="surprise"):
        check.check("POST", GENERATE, drifted)
    stream = served.post(CHAT, json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True})
    first, *rest = stream.text.split("\n\n", 1)
    event = json.loads(first[len("data: ") :])
    event["choices"][0]["delta"]["surprise"] = "x"
    drifted = httpx.Response(
        200,
        text=f"data: {json.dumps(event)}\n\n{rest[0]}",
        request=stream.request,
        headers={"content-type": "text/event-stream"},
    )
    with pytest.raises(AssertionError, match="surprise"):
        check.check("POST", CHAT, drifted)


def test_the_schema_is_valid_openapi_3_1(spec):
    assert spec["openapi"].startswith("3.1")
    assert spec["info"]["title"] == "ForgeLLM"
    validate_openapi(spec)


@pytest.mark.parametrize("page", ["/docs", "/docs/swagger", "/docs/redoc"])
def test_docs_pages_are_served(served, page):
    response = served.get(page)
    assert response.status_code == 200
    assert media_type(response) == "text/html"
    assert "<title>ForgeLLM</title>" in response.text


# The console's page, its assets and the redirect to it are a web page, not API operations; its state API is.
CONSOLE_PAGES = {"/", "/console", "/console/assets/{name:str}"}


def test_every_route_is_in_the_schema_plugin_routes_included(served, spec):
    expected = {
        (path, method.lower())
        for route in served.app.routes
        if isinstance(route, HTTPRoute) and not route.path.startswith("/docs") and route.path not in CONSOLE_PAGES
        for path in [route.path_format]
        for method in route.route_handler_map
        if method != "OPTIONS"  # answered before routing, never by a route
    }
    documented = {(path, method) for path, item in spec["paths"].items() for method in item}
    assert ("/metrics", "get") in expected  # the metrics plugin's route
    assert expected == documented


def test_request_and_response_models_are_named_components(spec):
    schemas = spec["components"]["schemas"]
    for name in (
        "GenerateRequest",
        "GenerateResponse",
        "LoadRequest",
        "LoadResponse",
        "StatusResponse",
        "CompletionRequest",
        "CompletionResponse",
        "ChatCompletionRequest",
        "ChatCompletionResponse",
        "ModelList",
        "ErrorEnvelope",
        "OpenAIError",
    ):
        assert name in schemas
    body = spec["paths"][GENERATE]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/GenerateRequest"}


def test_api_routes_declare_their_errors_in_the_right_shape(spec):
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            responses = operation["responses"]
            if path.startswith(("/api/", "/v1/", "/metrics")):
                assert {"401", "403"} <= set(responses), f"{method} {path}"
            shape = "OpenAIError" if path.startswith("/v1/") else "ErrorEnvelope"
            for status, response in responses.items():
                if status.startswith(("4", "5")) and path != "/readyz":
                    assert response["content"]["application/json"]["schema"] == {
                        "$ref": f"#/components/schemas/{shape}"
                    }, f"{method} {path} {status}"
    for path in (GENERATE, COMPLETIONS, CHAT):
        assert {"400", "401", "403", "413", "429", "503"} <= set(spec["paths"][path]["post"]["responses"])


def test_streaming_bodies_are_documented_beside_the_json_ones(spec):
    assert set(spec["paths"][GENERATE]["post"]["responses"]["200"]["content"]) == {
        "application/json",
        "application/x-ndjson",
    }
    for path in (COMPLETIONS, CHAT):
        assert set(spec["paths"][path]["post"]["responses"]["200"]["content"]) == {
            "application/json",
            "text/event-stream",
        }


# Real responses against the declared schemas --------------------------------------------------------

CASES = [
    ("GET", "/api/model/status", None, 200),
    ("POST", GENERATE, {"prompt": "Once upon a time", "max_tokens": 4}, 200),
    ("POST", GENERATE, {"prompt": "Once upon a time", "max_tokens": 4, "streaming": True}, 200),
    ("POST", GENERATE, {"prompt": "hi", "history": [{"role": "user", "content": "a"}], "max_tokens": 2}, 200),
    ("POST", GENERATE, {"prompt": 5}, 400),
    ("POST", GENERATE, {"prompt": "x" * 70_000}, 413),
    ("POST", "/api/model/load", {"model_name": "/nowhere/model"}, 400),
    ("GET", "/v1/models", None, 200),
    ("POST", COMPLETIONS, {"prompt": "Hello", "max_tokens": 3}, 200),
    (
        "POST",
        COMPLETIONS,
        {"prompt": "Hello", "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}},
        200,
    ),
    ("POST", COMPLETIONS, {"prompt": "Hello", "n": 17}, 400),
    ("POST", COMPLETIONS, {"prompt": ["Hello", "Bye"], "n": 2, "max_tokens": 2, "logprobs": 2}, 200),
    (
        "POST",
        CHAT,
        {
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 2,
            "logprobs": True,
            "top_logprobs": 2,
            "stream": True,
        },
        200,
    ),
    ("POST", COMPLETIONS, {"prompt": "Hello", "model": "some-other-model"}, 404),
    ("POST", CHAT, {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}, 200),
    (
        "POST",
        CHAT,
        {
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 3,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        200,
    ),
    ("POST", CHAT, {"messages": []}, 400),
    ("GET", "/healthz", None, 200),
    ("GET", "/readyz", None, 200),
    ("GET", "/metrics", None, 200),
]


@pytest.mark.parametrize(("method", "path", "body", "status"), CASES)
def test_real_responses_match_the_schema(served, spec, method, path, body, status):
    response = served.request(method, path, json=body)
    assert response.status_code == status, response.text
    conforms(spec, method, path, response)


def test_load_unload_and_readiness_responses_match_the_schema(spec, tiny_model):
    with test_client() as empty:
        not_ready = empty.get("/readyz")
        assert not_ready.status_code == 503
        conforms(spec, "GET", "/readyz", not_ready)
        loaded = empty.post("/api/model/load", json={"model_name": str(tiny_model)})
        assert loaded.status_code == 200
        conforms(spec, "POST", "/api/model/load", loaded)
        assert wait_until_loaded(empty)["loaded"]
        unloaded = empty.post("/api/model/unload")
        assert unloaded.status_code == 200
        conforms(spec, "POST", "/api/model/unload", unloaded)


def test_auth_refusals_match_the_schema(spec, tiny_model):
    with test_client(
        tiny_model, plugins="auth,metrics", api_key=("schema-test-key",), allow_model=("/allowed/*",)
    ) as locked:
        for method, path in (("GET", "/api/model/status"), ("GET", "/v1/models"), ("GET", "/metrics"), ("POST", CHAT)):
            response = locked.request(method, path, json={"messages": [{"role": "user", "content": "x"}]})
            assert response.status_code == 401
            conforms(spec, method, path, response)
        forbidden = locked.post(
            "/api/model/load",
            json={"model_name": "/elsewhere/model"},
            headers={"Authorization": "Bearer schema-test-key"},
        )
        assert forbidden.status_code == 403
        conforms(spec, "POST", "/api/model/load", forbidden)


def test_rate_limit_refusals_match_the_schema(spec, tiny_model):
    with test_client(tiny_model, plugins="ratelimit", rate_limit="1/minute") as limited:
        assert limited.post(GENERATE, json={"prompt": "hi", "max_tokens": 1}).status_code == 200
        guide = limited.post(GENERATE, json={"prompt": "hi", "max_tokens": 1})
        openai = limited.post(CHAT, json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
        assert guide.status_code == openai.status_code == 429
        conforms(spec, "POST", GENERATE, guide)
        conforms(spec, "POST", CHAT, openai)
