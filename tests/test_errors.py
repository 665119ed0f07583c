"""The guide's error contract: every failure is {"success": false, "error": "..."} with the right status.

Each bad input the issue names gets a 4xx envelope; a backend failure is a 500 envelope
after which the server keeps serving; no response ever carries a stack trace.
"""

from __future__ import annotations

import json

import pytest
from faulty_backend import STEP_FAULT, STEP_FAULT_MESSAGE, Faults

from forgellm.testing import test_client, wait_until_loaded

STACK_TRACE_MARKERS = ("Traceback", 'File "', '.py", line', "site-packages")


def assert_envelope(response, status: int, error: str | None = None) -> str:
    """The response is the guide's error envelope with this status; returns its message."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"success", "error"}
    assert body["success"] is False
    assert isinstance(body["error"], str) and body["error"]
    assert not any(marker in response.text for marker in STACK_TRACE_MARKERS), response.text
    if error is not None:
        assert body["error"] == error
    return body["error"]


@pytest.fixture(scope="module")
def empty_server():
    """No model loaded, and a small body limit so 413s are cheap to provoke."""
    with test_client(max_body_size=1024) as c:
        yield c


# -- unknown paths and methods ---------------------------------------------------------------


@pytest.mark.parametrize("method, path", [("GET", "/nope"), ("POST", "/api/model/nope"), ("GET", "/api/model")])
def test_unknown_path_is_404(client, method, path):
    assert_envelope(client.request(method, path), 404, "Not found")


@pytest.mark.parametrize(
    "method, path",
    [
        ("GET", "/api/model/generate"),
        ("GET", "/api/model/load"),
        ("GET", "/api/model/unload"),
        ("POST", "/api/model/status"),
        ("DELETE", "/api/model/status"),
        ("PUT", "/api/model/generate"),
    ],
)
def test_wrong_method_is_405(client, method, path):
    assert_envelope(client.request(method, path), 405, "Method not allowed")


# -- oversized bodies ------------------------------------------------------------------------

OVERSIZED = json.dumps({"prompt": "x" * 4000, "max_tokens": 4}).encode()


@pytest.mark.parametrize("path", ["/api/model/generate", "/api/model/load"])
def test_body_over_max_body_size_is_413(empty_server, path):
    response = empty_server.post(path, content=OVERSIZED, headers={"Content-Type": "application/json"})
    assert_envelope(response, 413, "Request body too large")


def test_chunked_body_over_max_body_size_is_413(empty_server):
    """Without a Content-Length the limit still holds, counted as the body arrives."""

    def chunks():
        for start in range(0, len(OVERSIZED), 512):
            yield OVERSIZED[start : start + 512]

    response = empty_server.post("/api/model/generate", content=chunks(), headers={"Content-Type": "application/json"})
    assert_envelope(response, 413, "Request body too large")


def test_body_under_max_body_size_is_read(empty_server):
    # Small enough to pass the limit: the answer is about the model, not the size.
    response = empty_server.post("/api/model/generate", json={"prompt": "x" * 500})
    assert_envelope(response, 400, "No model loaded")


# -- no model ----------------------------------------------------------------------------------


@pytest.mark.parametrize("streaming", [False, True])
def test_generate_without_a_model_is_400_no_model_loaded(empty_server, streaming):
    response = empty_server.post("/api/model/generate", json={"prompt": "Hello", "streaming": streaming})
    assert_envelope(response, 400, "No model loaded")


# -- validation: generate ----------------------------------------------------------------------

INVALID_GENERATE_BODIES = {
    "invalid JSON": b'{"prompt": "Hello",',
    "empty body": b"",
    "not JSON at all": b"prompt=Hello",
    "NaN is not JSON": b'{"prompt": "Hello", "temperature": NaN}',
    "invalid UTF-8": b'{"prompt": "\xff\xfe"}',
    "array body": b'["Hello"]',
    "string body": b'"Hello"',
    "number body": b"42",
    "null body": b"null",
    "missing prompt": b"{}",
    "missing prompt, other fields": b'{"max_tokens": 10}',
    "prompt not a string": b'{"prompt": 42}',
    "prompt null": b'{"prompt": null}',
    "prompt a list": b'{"prompt": ["Hello"]}',
    "max_tokens a word": b'{"prompt": "Hello", "max_tokens": "ten"}',
    "max_tokens a float": b'{"prompt": "Hello", "max_tokens": 1.5}',
    "max_tokens a bool": b'{"prompt": "Hello", "max_tokens": true}',
    "max_tokens 0": b'{"prompt": "Hello", "max_tokens": 0}',
    "max_tokens negative": b'{"prompt": "Hello", "max_tokens": -1}',
    "temperature a string": b'{"prompt": "Hello", "temperature": "hot"}',
    "temperature negative": b'{"prompt": "Hello", "temperature": -0.5}',
    "top_p 0": b'{"prompt": "Hello", "top_p": 0}',
    "top_p above 1": b'{"prompt": "Hello", "top_p": 1.5}',
    "top_k negative": b'{"prompt": "Hello", "top_k": -1}',
    "min_p above 1": b'{"prompt": "Hello", "min_p": 2}',
    "repetition_penalty 0": b'{"prompt": "Hello", "repetition_penalty": 0}',
    "seed negative": b'{"prompt": "Hello", "seed": -1}',
    "stop a number": b'{"prompt": "Hello", "stop": 5}',
    "stop a list of numbers": b'{"prompt": "Hello", "stop": [1, 2]}',
    "too many stop strings": json.dumps({"prompt": "Hello", "stop": [f"s{i}" for i in range(17)]}).encode(),
    "system_prompt not a string": b'{"prompt": "Hello", "system_prompt": {"role": "system"}}',
    "history not a list": b'{"prompt": "Hello", "history": "earlier"}',
    "history item not an object": b'{"prompt": "Hello", "history": ["hi"]}',
    "history item without content": b'{"prompt": "Hello", "history": [{"role": "user"}]}',
    "history item with unknown role": b'{"prompt": "Hello", "history": [{"role": "robot", "content": "beep"}]}',
    "streaming not a bool": b'{"prompt": "Hello", "streaming": "yes"}',
    # Litestar decodes bodies in msgspec's lax mode ("10" becomes 10); routes re-read them strictly.
    "max_tokens a numeric string": b'{"prompt": "Hello", "max_tokens": "2"}',
    "seed a numeric string": b'{"prompt": "Hello", "max_tokens": 2, "seed": "7"}',
    "temperature a numeric string": b'{"prompt": "Hello", "max_tokens": 2, "temperature": "0.5"}',
    "streaming the string true": b'{"prompt": "Hello", "max_tokens": 2, "streaming": "true"}',
}


JSON = {"Content-Type": "application/json"}


@pytest.mark.parametrize("body", INVALID_GENERATE_BODIES.values(), ids=INVALID_GENERATE_BODIES.keys())
def test_invalid_generate_request_is_400(client, body):
    response = client.post("/api/model/generate", content=body, headers={"Content-Type": "application/json"})
    assert_envelope(response, 400)


def test_invalid_json_says_so(client):
    body = b'{"prompt": '
    error = assert_envelope(client.post("/api/model/generate", content=body, headers=JSON), 400)
    assert "not valid JSON" in error


def test_json_nested_a_thousand_deep_is_a_400_not_a_500(client):
    body = b'{"prompt": ' + b"[" * 1000 + b"]" * 1000 + b"}"
    for path in ("/api/model/generate", "/v1/chat/completions"):
        response = client.post(path, content=body, headers=JSON)
        assert response.status_code == 400, response.text
        assert "nested too deeply" in response.text


def test_missing_field_is_named(client):
    error = assert_envelope(client.post("/api/model/generate", json={"max_tokens": 5}), 400)
    assert "prompt" in error


def test_wrong_type_names_the_field(client):
    error = assert_envelope(client.post("/api/model/generate", json={"prompt": "Hi", "max_tokens": "ten"}), 400)
    assert "max_tokens" in error


def test_max_tokens_above_the_cap_is_400(client):
    cap = client.app.state.server.settings.max_tokens_cap
    error = assert_envelope(client.post("/api/model/generate", json={"prompt": "Hi", "max_tokens": cap + 1}), 400)
    assert error == f"max_tokens must be at most {cap}"


def test_max_tokens_cap_is_configurable(tiny_model):
    with test_client(tiny_model, max_tokens_cap=8) as capped:
        assert_envelope(capped.post("/api/model/generate", json={"prompt": "Hi", "max_tokens": 9}), 400)
        ok = capped.post("/api/model/generate", json={"prompt": "Hi", "max_tokens": 8})
        assert ok.status_code == 200 and ok.json()["completion_tokens"] == 8


def test_prompt_longer_than_max_prompt_tokens_is_400(tiny_model):
    with test_client(tiny_model, max_prompt_tokens=16) as limited:
        error = assert_envelope(limited.post("/api/model/generate", json={"prompt": "word " * 100}), 400)
        assert "limit is 16" in error


def test_streaming_request_with_bad_input_is_an_envelope_not_a_stream(client):
    response = client.post("/api/model/generate", json={"prompt": "Hi", "max_tokens": 0, "streaming": True})
    assert_envelope(response, 400)


# -- validation: load --------------------------------------------------------------------------

INVALID_LOAD_BODIES = {
    "invalid JSON": b'{"model_name": ',
    "array body": b'["model"]',
    "null body": b"null",
    "missing model_name": b'{"adapter_path": null}',
    "model_name not a string": b'{"model_name": 42}',
    "model_name empty": b'{"model_name": ""}',
    "adapter_path not a string": b'{"model_name": "m", "adapter_path": 7}',
    "adapter_path empty": b'{"model_name": "m", "adapter_path": ""}',
}


@pytest.mark.parametrize("body", INVALID_LOAD_BODIES.values(), ids=INVALID_LOAD_BODIES.keys())
def test_invalid_load_request_is_400(empty_server, body):
    response = empty_server.post("/api/model/load", content=body, headers={"Content-Type": "application/json"})
    assert_envelope(response, 400)
    assert empty_server.get("/api/model/status").json()["is_loading"] is False


def test_load_of_a_missing_directory_is_400_and_says_only_what_an_existing_one_would(empty_server, tmp_path):
    missing, empty = tmp_path / "no-such-model", tmp_path / "empty-dir"
    empty.mkdir()
    expected = f"Model {missing} was not found or is not loadable"
    assert_envelope(empty_server.post("/api/model/load", json={"model_name": str(missing)}), 400, expected)
    # A directory that exists but does not load: the same words, in status (no --allow-model: any path may be asked).
    assert empty_server.post("/api/model/load", json={"model_name": str(empty)}).status_code == 200
    assert wait_until_loaded(empty_server)["error"] == f"Model {empty} was not found or is not loadable"


def test_with_allow_model_a_missing_directory_is_named(tmp_path):
    missing = tmp_path / "no-such-model"
    with test_client(allow_model=(f"{tmp_path}/*",)) as server:
        assert_envelope(
            server.post("/api/model/load", json={"model_name": str(missing)}),
            400,
            f"Model directory not found: {missing}",
        )


def test_load_with_a_missing_adapter_directory_is_400(empty_server, tiny_model, tmp_path):
    missing = tmp_path / "no-such-adapter"
    assert_envelope(
        empty_server.post("/api/model/load", json={"model_name": str(tiny_model), "adapter_path": str(missing)}),
        400,
        f"Model {tiny_model} with adapter {missing} was not found or is not loadable",
    )


# -- backend failure ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def faulty_server(tiny_model):
    with test_client(tiny_model, backend=Faults().backend) as c:
        yield c


def test_backend_failure_is_500_and_the_server_keeps_serving(faulty_server):
    failed = faulty_server.post("/api/model/generate", json={"prompt": STEP_FAULT, "max_tokens": 4})
    error = assert_envelope(failed, 500)
    assert STEP_FAULT_MESSAGE in error

    after = faulty_server.post("/api/model/generate", json={"prompt": "Hello", "max_tokens": 4})
    assert after.status_code == 200
    assert after.json()["completion_tokens"] == 4
    assert faulty_server.get("/api/model/status").json()["loaded"] is True


def test_backend_failure_while_streaming_ends_with_an_error_line(faulty_server):
    response = faulty_server.post(
        "/api/model/generate", json={"prompt": STEP_FAULT, "max_tokens": 4, "streaming": True}
    )
    assert response.status_code == 200  # the status line went out before the failure
    last = json.loads(response.text.splitlines()[-1])
    assert last["type"] == "error" and last["success"] is False
    assert STEP_FAULT_MESSAGE in last["error"]
    assert not any(marker in response.text for marker in STACK_TRACE_MARKERS)

    after = faulty_server.post("/api/model/generate", json={"prompt": "Hello", "max_tokens": 4, "streaming": True})
    assert json.loads(after.text.splitlines()[-1])["type"] == "complete"


# top_k passes validation (>= 0) but mlx-lm refuses a top_k beyond the vocabulary inside the engine
# step; that exception leaves the engine thread's MLX random state without a value, so every later
# unseeded sampled request fails too. Reported to the owner of forgellm/backends/mlx.py.
BEYOND_VOCABULARY = {"top_k": 100_000}


def test_top_k_beyond_the_vocabulary_is_not_a_server_error(tiny_model):
    with test_client(tiny_model) as own:
        response = own.post("/api/model/generate", json={"prompt": "Hi", "max_tokens": 4, **BEYOND_VOCABULARY})
        assert response.status_code < 500, response.text


def test_sampling_still_works_after_a_failed_engine_step(tiny_model):
    with test_client(tiny_model) as own:  # its own engine thread: the failure poisons that thread's state
        own.post("/api/model/generate", json={"prompt": "Hi", "max_tokens": 4, **BEYOND_VOCABULARY})
        after = own.post("/api/model/generate", json={"prompt": "Hi", "max_tokens": 4, "temperature": 0.7})
        assert after.status_code == 200, after.text
