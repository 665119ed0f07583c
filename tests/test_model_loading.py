"""The load state machine, seen through status as the guide's polling clients see it.

Loads are real (mlx-lm's loader on the tiny model). To observe the "while loading" states
deterministically, some tests register the MLX backend through a plugin that holds each load
until the test opens a gate; everything after the gate is the real backend.
"""

from __future__ import annotations

import contextlib
import gc
import json
import shutil
import threading
import time
import weakref

import pytest
from faulty_backend import Faults
from wire import loaded_status

from forgellm.testing import test_client, wait_until_loaded


@contextlib.contextmanager
def gated_server(*, gate_open: bool = True, **settings):
    """An in-process server whose loads wait for faults.load_gate; yields (client, faults)."""
    faults = Faults()
    if not gate_open:
        faults.load_gate.clear()
    with test_client(backend=faults.backend, wait_for_model=False, **settings) as client:
        try:
            yield client, faults
        finally:
            faults.load_gate.set()  # the engine thread must finish any held load before it can stop


def status(client) -> dict:
    return client.get("/api/model/status").json()


def load(client, model, adapter=None):
    response = client.post(
        "/api/model/load", json={"model_name": str(model), "adapter_path": str(adapter) if adapter else None}
    )
    assert response.status_code == 200, response.text
    return response.json()


def greedy(client, prompt="Once upon a time", max_tokens=12) -> str:
    response = client.post("/api/model/generate", json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    assert response.status_code == 200, response.text
    return response.json()["text"]


def assert_503_while_loading(response) -> None:
    assert response.status_code == 503
    assert int(response.headers["Retry-After"]) >= 1
    body = response.json()
    assert body["success"] is False and "loading" in body["error"]


# -- loading -----------------------------------------------------------------------------------


def test_status_shows_is_loading_as_soon_as_load_returns(tiny_model):
    with gated_server() as (client, backend):
        backend.load_gate.clear()
        load(client, tiny_model)
        assert status(client)["is_loading"] is True
        deadline = time.monotonic() + 10  # the load reaches the backend on the engine thread
        while status(client)["progress"] is None and time.monotonic() < deadline:
            time.sleep(0.02)

        assert status(client) == {
            "success": True,
            "loaded": False,
            "is_loading": True,
            "model_name": str(tiny_model),
            "adapter_path": None,
            "error": None,
            "progress": "waiting for the test's gate",
        }
        backend.load_gate.set()
        assert wait_until_loaded(client) == loaded_status(str(tiny_model))
        assert greedy(client)


def test_polling_client_never_reads_a_good_load_as_a_failure(tiny_model):
    """The guide's client stops polling at loaded=false, is_loading=false: a load must never show that."""
    with test_client() as client:
        for _ in range(3):
            load(client, tiny_model)
            first = status(client)
            assert first["is_loading"] or first["loaded"], first
            assert first["model_name"] == str(tiny_model)
            assert wait_until_loaded(client)["loaded"] is True


def test_model_given_at_start_loads_while_the_server_already_answers(tiny_model):
    """What `forgellm run --model` relies on: startup only begins the load."""
    with gated_server(gate_open=False, model=str(tiny_model)) as (client, backend):
        held = status(client)
        assert held["is_loading"] is True and held["loaded"] is False
        assert held["model_name"] == str(tiny_model)
        assert client.get("/readyz").status_code == 503
        assert_503_while_loading(client.post("/api/model/generate", json={"prompt": "Hi"}))

        backend.load_gate.set()
        assert wait_until_loaded(client)["loaded"] is True
        assert client.get("/readyz").status_code == 200


def test_generate_during_a_load_is_503_with_retry_after(tiny_model):
    with gated_server() as (client, backend):
        backend.load_gate.clear()
        load(client, tiny_model)

        assert_503_while_loading(client.post("/api/model/generate", json={"prompt": "Hi", "max_tokens": 4}))
        assert_503_while_loading(
            client.post("/api/model/generate", json={"prompt": "Hi", "max_tokens": 4, "streaming": True})
        )
        openai = client.post("/v1/completions", json={"model": str(tiny_model), "prompt": "Hi", "max_tokens": 4})
        assert openai.status_code == 503 and int(openai.headers["Retry-After"]) >= 1
        assert "loading" in openai.json()["error"]["message"]


def test_a_second_load_during_a_load_is_refused_with_409(tiny_model, tiny_model_without_template):
    """Concurrent loads are refused, not queued: the client that asked second learns it at once."""
    with gated_server() as (client, backend):
        backend.load_gate.clear()
        load(client, tiny_model)

        second = client.post("/api/model/load", json={"model_name": str(tiny_model_without_template)})
        assert second.status_code == 409
        assert second.json() == {
            "success": False,
            "error": f"Model {tiny_model} is already loading; wait for it to finish",
        }
        unload = client.post("/api/model/unload")
        assert unload.status_code == 409
        assert unload.json()["success"] is False

        backend.load_gate.set()
        final = wait_until_loaded(client)
        assert final["loaded"] is True and final["model_name"] == str(tiny_model)


def test_swap_shows_the_new_model_loading_until_it_serves(tiny_model, tiny_model_without_template):
    with gated_server() as (client, backend):
        load(client, tiny_model)
        assert wait_until_loaded(client)["loaded"] is True

        backend.load_gate.clear()
        load(client, tiny_model_without_template)
        during = status(client)
        assert during["loaded"] is False
        assert during["is_loading"] is True
        assert during["model_name"] == str(tiny_model_without_template)
        assert_503_while_loading(client.post("/api/model/generate", json={"prompt": "Hi", "max_tokens": 4}))

        backend.load_gate.set()
        after = wait_until_loaded(client)
        assert after["loaded"] is True and after["model_name"] == str(tiny_model_without_template)
        assert greedy(client)


def test_generation_in_flight_finishes_before_a_swap(tiny_model, tiny_model_without_template):
    with gated_server() as (client, backend):
        load(client, tiny_model)
        wait_until_loaded(client)
        scheduler = client.app.state.server.default_model.scheduler
        results = {}

        def long_generation():
            results["response"] = client.post(
                "/api/model/generate", json={"prompt": "Hello", "max_tokens": 300, "temperature": 0}
            )

        worker = threading.Thread(target=long_generation)
        worker.start()
        deadline = time.monotonic() + 30
        while scheduler.in_flight == 0 and worker.is_alive() and time.monotonic() < deadline:
            time.sleep(0.005)
        backend.load_gate.clear()
        load(client, tiny_model_without_template)
        assert worker.is_alive(), "the generation ended before the swap was asked for; make it longer"
        worker.join(timeout=60)

        response = results["response"]
        assert response.status_code == 200, response.text
        assert response.json()["completion_tokens"] == 300
        assert response.json()["finish_reason"] == "length"
        backend.load_gate.set()
        assert wait_until_loaded(client)["model_name"] == str(tiny_model_without_template)


# -- failures ----------------------------------------------------------------------------------


def break_weights(model_dir):
    (model_dir / "model.safetensors").write_bytes(b"\x00not a safetensors file" * 16)


def remove_weights(model_dir):
    (model_dir / "model.safetensors").unlink()


def break_config(model_dir):
    (model_dir / "config.json").write_text("{ this is not json")


def shrink_weights(model_dir):
    """Valid safetensors, wrong shapes: the config promises a larger hidden size than the weights have."""
    config = json.loads((model_dir / "config.json").read_text())
    config["hidden_size"] *= 2
    (model_dir / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def server(tiny_model):
    """A server the failure tests share; each test leaves the tiny model loaded again."""
    with test_client(tiny_model) as client:
        yield client


@pytest.mark.parametrize("damage", [break_weights, remove_weights, break_config, shrink_weights])
def test_failed_load_ends_not_loaded_with_the_reason(server, tiny_model, tmp_path, damage):
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model, broken)
    damage(broken)
    assert status(server)["loaded"] is True

    load(server, broken)
    final = wait_until_loaded(server)

    assert final["loaded"] is False
    assert final["is_loading"] is False
    assert final["model_name"] == str(broken)
    assert isinstance(final["error"], str) and final["error"]
    assert "Traceback" not in final["error"] and "\n" not in final["error"]
    # The previous model was closed for the swap; nothing serves now.
    generate = server.post("/api/model/generate", json={"prompt": "Hi", "max_tokens": 4})
    assert generate.status_code == 400
    assert generate.json() == {"success": False, "error": "No model loaded"}
    # A failed load does not wedge the manager: the next good load serves.
    load(server, tiny_model)
    assert wait_until_loaded(server) == loaded_status(str(tiny_model))


def test_unknown_repo_id_fails_without_touching_the_network(server, tiny_model):
    import huggingface_hub.constants

    assert huggingface_hub.constants.HF_HUB_OFFLINE, "tests must run with HF_HUB_OFFLINE=1 (see conftest.py)"
    load(server, "forgellm-tests/no-such-model")
    final = wait_until_loaded(server)
    assert final["loaded"] is False and final["is_loading"] is False
    assert final["error"]
    load(server, tiny_model)
    assert wait_until_loaded(server)["loaded"] is True


# -- adapters ----------------------------------------------------------------------------------


def test_adapter_changes_greedy_output(server, tiny_model, tiny_adapter):
    prompts = ("Once upon a time", "The model")
    base = [greedy(server, prompt) for prompt in prompts]

    load(server, tiny_model, tiny_adapter)
    final = wait_until_loaded(server)
    assert final["loaded"] is True and final["adapter_path"] == str(tiny_adapter)
    adapted = [greedy(server, prompt) for prompt in prompts]

    assert adapted != base
    assert adapted == [greedy(server, prompt) for prompt in prompts]  # still greedy, so still deterministic
    load(server, tiny_model)
    assert wait_until_loaded(server)["adapter_path"] is None
    assert [greedy(server, prompt) for prompt in prompts] == base


def empty_adapter(adapter_dir):
    for item in adapter_dir.iterdir():
        item.unlink()


def garbage_adapter_weights(adapter_dir):
    (adapter_dir / "adapters.safetensors").write_bytes(b"garbage" * 10)


def missing_adapter_weights(adapter_dir):
    (adapter_dir / "adapters.safetensors").unlink()


def mismatched_adapter_rank(adapter_dir):
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    config["lora_parameters"]["rank"] *= 2
    (adapter_dir / "adapter_config.json").write_text(json.dumps(config))


def adapter_for_other_layers(adapter_dir):
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    config["lora_parameters"]["keys"] = ["mlp.up_proj"]
    (adapter_dir / "adapter_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "damage",
    [
        empty_adapter,
        garbage_adapter_weights,
        missing_adapter_weights,
        mismatched_adapter_rank,
        adapter_for_other_layers,
    ],
)
def test_bad_adapter_is_a_load_error_never_the_base_model(server, tiny_model, tiny_adapter, tmp_path, damage):
    bad = tmp_path / "bad-adapter"
    shutil.copytree(tiny_adapter, bad)
    damage(bad)

    load(server, tiny_model, bad)
    final = wait_until_loaded(server)

    assert final["loaded"] is False, "a broken adapter must not fall back to the base model"
    assert final["is_loading"] is False
    assert final["adapter_path"] == str(bad)
    assert final["error"]
    generate = server.post("/api/model/generate", json={"prompt": "Hi", "max_tokens": 4})
    assert generate.json() == {"success": False, "error": "No model loaded"}
    load(server, tiny_model)
    assert wait_until_loaded(server)["loaded"] is True


# -- unloading ---------------------------------------------------------------------------------


def test_unload_releases_the_model_object(tiny_model):
    with test_client(tiny_model) as client:
        serving = weakref.ref(client.app.state.server.default_model.model)
        greedy(client)

        assert client.post("/api/model/unload").json()["success"] is True
        deadline = time.monotonic() + 10
        while serving() is not None and time.monotonic() < deadline:
            gc.collect()
            time.sleep(0.01)

        assert serving() is None, "the unloaded model is still referenced"
        assert status(client)["loaded"] is False
        assert client.post("/api/model/generate", json={"prompt": "Hi"}).json() == {
            "success": False,
            "error": "No model loaded",
        }
        load(client, tiny_model)
        assert wait_until_loaded(client)["loaded"] is True
