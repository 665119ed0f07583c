"""The integration guide's endpoints over HTTP: the response shapes its clients read.

Error cases live in test_errors.py, the load state machine in test_model_loading.py,
and sampling behaviour in test_generate.py.
"""

from __future__ import annotations

import json

from wire import loaded_status

from forgellm.testing import test_client, wait_until_loaded

GUIDE_STATUS_FIELDS = {"success", "loaded", "is_loading", "model_name", "adapter_path"}
GENERATE_FIELDS = {
    "success",
    "text",
    "generation_time",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "tokens_per_sec",
    "finish_reason",
}


def test_status_describes_the_loaded_model(client, tiny_model):
    response = client.get("/api/model/status")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    status = response.json()
    assert GUIDE_STATUS_FIELDS <= set(status)
    assert status == loaded_status(str(tiny_model))


def test_load_answers_at_once_with_the_guides_response(client, tiny_model):
    response = client.post("/api/model/load", json={"model_name": str(tiny_model), "adapter_path": None})

    assert response.status_code == 200
    assert response.json() == {
        "success": True,
        "message": f"Model {tiny_model} loading started",
        "model_name": str(tiny_model),
        "adapter_path": None,
    }
    assert wait_until_loaded(client)["loaded"] is True


def test_load_accepts_the_guides_curl_body_without_adapter_path(client, tiny_model):
    response = client.post("/api/model/load", json={"model_name": str(tiny_model)})

    assert response.status_code == 200
    assert response.json()["adapter_path"] is None
    assert wait_until_loaded(client)["loaded"] is True


def test_generate_answers_the_guides_request(client):
    response = client.post("/api/model/generate", json={"prompt": "Hello, world!", "max_tokens": 12})

    assert response.status_code == 200
    result = response.json()
    assert set(result) == GENERATE_FIELDS
    assert result["success"] is True
    assert isinstance(result["text"], str) and result["text"]
    assert result["generation_time"] > 0
    assert result["completion_tokens"] == 12  # the tiny model never emits EOS
    assert result["prompt_tokens"] > 0
    assert result["total_tokens"] == result["prompt_tokens"] + result["completion_tokens"]
    assert result["tokens_per_sec"] > 0
    assert result["finish_reason"] == "length"


def test_generate_without_max_tokens_uses_the_configured_default(client):
    default = client.app.state.server.settings.default_max_tokens

    result = client.post("/api/model/generate", json={"prompt": "Hello"}).json()

    assert result["completion_tokens"] == default


def test_streaming_sends_chunk_lines_then_one_complete_line(client):
    request = {"prompt": "Once upon a time", "max_tokens": 16, "temperature": 0}
    with client.stream("POST", "/api/model/generate", json={**request, "streaming": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in response.iter_lines() if line.strip()]

    *chunks, complete = lines
    assert chunks and all(line == {"type": "chunk", "text": line["text"]} for line in chunks)
    assert complete["type"] == "complete"
    assert GENERATE_FIELDS <= set(complete)
    assert complete["success"] is True
    assert complete["text"] == "".join(chunk["text"] for chunk in chunks)
    assert complete["completion_tokens"] == 16
    assert complete["total_tokens"] == complete["prompt_tokens"] + 16
    assert complete["finish_reason"] == "length"
    # Streaming changes the framing, not the generation.
    plain = client.post("/api/model/generate", json=request).json()
    assert complete["text"] == plain["text"]
    assert complete["prompt_tokens"] == plain["prompt_tokens"]


def test_unload_frees_the_model_and_generate_then_needs_a_load(tiny_model):
    with test_client(tiny_model) as own:
        response = own.post("/api/model/unload")

        assert response.status_code == 200
        assert response.json() == {"success": True, "message": f"Model {tiny_model} unloaded"}
        assert own.get("/api/model/status").json() == {
            "success": True,
            "loaded": False,
            "is_loading": False,
            "model_name": None,
            "adapter_path": None,
            "error": None,
            "progress": None,
        }
        generate = own.post("/api/model/generate", json={"prompt": "Hello", "max_tokens": 4})
        assert generate.status_code == 400
        assert generate.json() == {"success": False, "error": "No model loaded"}
        assert own.post("/api/model/unload").json() == {"success": True, "message": "No model was loaded"}


def test_health_probes_follow_the_model(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["ready"] is True


def test_readyz_is_503_without_a_model():
    with test_client() as empty:
        ready = empty.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["model_loaded"] is False
        assert empty.get("/healthz").status_code == 200
