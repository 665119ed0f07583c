"""Health probes: /healthz says the process answers, /readyz says it can generate; both public."""

from __future__ import annotations

import pytest

from forgellm.testing import test_client, wait_until_loaded


def test_healthz_answers_without_a_model():
    with test_client() as empty:
        response = empty.get("/healthz")
        assert response.status_code == 200
        assert response.json() == {"status": "ok"}


def test_readyz_is_503_until_a_model_is_loaded(tiny_model):
    with test_client() as server:
        waiting = server.get("/readyz")
        assert waiting.status_code == 503
        assert waiting.json() == {"ready": False, "model_loaded": False, "engine_alive": True}

        assert server.post("/api/model/load", json={"model_name": str(tiny_model)}).status_code == 200
        assert server.get("/readyz").status_code in (200, 503)  # loading happens in the background
        assert wait_until_loaded(server)["loaded"]
        ready = server.get("/readyz")
        assert ready.status_code == 200
        assert ready.json() == {"ready": True, "model_loaded": True, "engine_alive": True}

        assert server.post("/api/model/unload").status_code == 200
        assert server.get("/readyz").status_code == 503


def test_readyz_is_200_with_a_loaded_model_and_names_no_path(client, tiny_model):
    response = client.get("/readyz")
    assert response.status_code == 200
    assert str(tiny_model) not in response.text  # public: the model's local path is nobody's business


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_probes_answer_head_as_get_without_a_body(client, path):
    head, get = client.head(path), client.get(path)
    assert head.status_code == get.status_code == 200
    assert head.content == b""


@pytest.fixture(scope="module")
def locked(tiny_model):
    with test_client(tiny_model, plugins="auth", api_key=("probe-test-key",)) as server:
        yield server


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_probes_are_public_with_auth_on(locked, path):
    assert locked.get(path).status_code == 200
    # A wrong credential is not even looked at: probes come from orchestrators that hold none.
    assert locked.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 200


def test_the_api_beside_the_probes_is_not_public(locked):
    assert locked.get("/api/model/status").status_code == 401
    assert locked.get("/api/model/status", headers={"Authorization": "Bearer probe-test-key"}).status_code == 200
