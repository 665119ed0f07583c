"""Several models resident at once: each batched on its own, chosen per request, under a memory budget.

The models are tiny random-weight Llamas with different seeds; sizes come from the server's own
``/api/models`` (weights plus the KV caches its engines hold), so the budgets here are sized in
models, not in guessed bytes.
"""

from __future__ import annotations

import concurrent.futures
import gc
import json
import threading
import time

import httpx
import mlx.core as mx
import openai
import pytest
from live_server import idle, serving, wait_for

from forgellm import Backend
from forgellm.backends.mlx import MlxBackend
from forgellm.testing import build_tiny_model, test_client


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Three tiny models, different weights, one shape."""
    root = tmp_path_factory.mktemp("residents")
    return [build_tiny_model(root / name, seed=number) for number, name in enumerate(("m0", "m1", "m2"))]


def listing(client) -> dict[str, dict]:
    response = client.get("/api/models")
    assert response.status_code == 200, response.text
    return {entry["name"]: entry for entry in response.json()["models"]}


def wait_loaded(client, name: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = listing(client).get(name)
        if entry is not None and entry["state"] in ("loaded", "failed"):
            assert entry["state"] == "loaded", entry
            return entry
        time.sleep(0.05)
    raise AssertionError(f"{name} did not load")


def load(client, name: str, path, pin: bool = False) -> httpx.Response:
    return client.post("/api/models/load", json={"name": name, "model_name": str(path), "pin": pin})


def chat(client, model: str, max_tokens: int = 4, **fields) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": max_tokens, **fields}
    return client.post("/v1/chat/completions", json=body)


@pytest.fixture(scope="module")
def model_bytes(models):
    """What one tiny model takes once loaded, as the server counts it."""
    with test_client(models[0]) as client:
        return listing(client)[str(models[0])]["memory_bytes"]


def test_named_models_are_chosen_per_request_and_listed(models):
    with test_client([f"a={models[0]}", f"b={models[1]}"]) as client:
        wait_loaded(client, "b")
        entries = listing(client)
        assert entries["a"]["default"] and entries["a"]["pinned"] and entries["b"]["pinned"]
        assert not entries["b"]["default"] and entries["b"]["memory_bytes"] > 0
        answers = {name: chat(client, name, temperature=0).json() for name in ("a", "b")}
        assert {answers[name]["model"] for name in answers} == {"a", "b"}  # the names they are served as
        # Different weights, different greedy text: each request reached the model it named.
        assert answers["a"]["choices"][0]["message"]["content"] != answers["b"]["choices"][0]["message"]["content"]
        assert chat(client, str(models[1])).status_code == 200  # a model answers to its source as well
        ids = {card["id"] for card in client.get("/v1/models").json()["data"]}
        assert ids == {"a", "b"}  # names, not paths: the paths are in /api/models
        # The guide's routes speak of the default model.
        status = client.get("/api/model/status").json()
        assert status["loaded"] and status["model_name"] == str(models[0])
        generated = client.post("/api/model/generate", json={"prompt": "Hi", "max_tokens": 3})
        assert generated.status_code == 200 and generated.json()["completion_tokens"] == 3
        missing = chat(client, "nope")
        assert missing.status_code == 404 and "'a'" in missing.json()["error"]["message"]


def test_requests_to_two_models_are_batched_each_and_progress_together(models):
    with serving([f"a={models[0]}", f"b={models[1]}"], max_concurrency=4) as live:
        registry = live.app.state.server.registry
        wait_for(lambda: all(r.model is not None for r in registry.residents), "both models to load")
        steps_before = {name: registry.find(name).scheduler.steps for name in ("a", "b")}
        spans: dict[str, list[tuple[float, float]]] = {"a": [], "b": []}
        lock = threading.Lock()

        def stream(name: str) -> int:
            body = {"model": name, "prompt": "Once", "max_tokens": 40, "stream": True}
            first = None
            with httpx.stream("POST", f"{live.url}/v1/completions", json=body, timeout=120) as response:
                chunks = 0
                for line in response.iter_lines():
                    if line.startswith("data: {"):
                        first = first or time.monotonic()
                        chunks += 1
            with lock:
                spans[name].append((first or 0.0, time.monotonic()))
            return chunks

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            counts = list(pool.map(stream, ["a", "b"] * 3))
        assert all(count > 0 for count in counts)
        for name in ("a", "b"):
            steps = registry.find(name).scheduler.steps - steps_before[name]
            assert steps < 3 * 40, f"{name}: {steps} steps for 3 x 40 tokens: its requests were not batched"
        # Both models were generating at the same time: each started before the other's last one ended.
        assert min(s for s, _ in spans["a"]) < max(e for _, e in spans["b"])
        assert min(s for s, _ in spans["b"]) < max(e for _, e in spans["a"])


def test_the_least_recently_used_idle_model_goes_first(models, model_bytes):
    budget = int(model_bytes * 2.5)  # room for two of the three
    with test_client(None, memory_budget=str(budget), prompt_cache_size=0) as client:
        for name, path in (("m0", models[0]), ("m1", models[1])):
            assert load(client, name, path).status_code == 200
            wait_loaded(client, name)
        assert chat(client, "m0").status_code == 200  # m1 is now the least recently used
        assert load(client, "m2", models[2]).status_code == 200
        wait_loaded(client, "m2")
        entries = listing(client)
        assert set(entries) == {"default", "m0", "m2"}
        assert client.get("/api/models").json()["memory_in_use"] <= budget
        assert chat(client, "m1").status_code == 404


def test_a_model_in_flight_is_never_unloaded_and_a_full_house_refuses(models, model_bytes):
    budget = int(model_bytes * 2.5)
    with serving(None, memory_budget=str(budget), prompt_cache_size=0) as live:
        client = httpx.Client(base_url=live.url, timeout=120)
        assert load(client, "busy", models[0]).status_code == 200
        wait_loaded(client, "busy")
        assert load(client, "idle", models[1]).status_code == 200
        wait_loaded(client, "idle")
        chat(client, "idle")  # "busy" is the least recently used, and would go first if it were idle
        body = {"model": "busy", "prompt": "Once", "max_tokens": 300, "stream": True}
        streamed = []
        with httpx.stream("POST", f"{live.url}/v1/completions", json=body, timeout=120) as response:
            lines = response.iter_lines()
            for line in lines:
                if line.startswith("data: {"):
                    break  # generating
            assert load(client, "third", models[2]).status_code == 200
            wait_loaded(client, "third")
            assert set(listing(client)) == {"default", "busy", "third"}  # "idle" went, "busy" stayed
            assert client.get("/api/models").json()["memory_in_use"] <= budget
            streamed = [line for line in lines if line.startswith("data: {")]
        assert len(streamed) >= 290  # the stream went on to its end while the third model loaded


def test_a_busy_model_is_not_unloaded_even_when_nothing_else_can_go(models, model_bytes):
    with serving(None, memory_budget=str(int(model_bytes * 1.5)), prompt_cache_size=0) as live:
        client = httpx.Client(base_url=live.url, timeout=120)
        assert load(client, "busy", models[0]).status_code == 200
        wait_loaded(client, "busy")
        body = {"model": "busy", "prompt": "Once", "max_tokens": 200, "stream": True}
        with httpx.stream("POST", f"{live.url}/v1/completions", json=body, timeout=120) as response:
            lines = response.iter_lines()
            next(line for line in lines if line.startswith("data: {"))
            refused = load(client, "other", models[1])
            assert refused.status_code == 503 and int(refused.headers["Retry-After"]) > 0
            assert "requests in flight" in refused.json()["error"]
            rest = [line for line in lines if line.startswith("data: {")]
        assert len(rest) >= 190  # the stream carried on to its end
        wait_for(lambda: idle(live.app.state.server.registry.find("busy").scheduler), "busy to finish")
        assert load(client, "other", models[1]).status_code == 200  # now idle, "busy" makes room
        wait_loaded(client, "other")
        assert set(listing(client)) == {"default", "other"}
        assert live.app.state.server.registry.evictions == {"busy": 1}


def test_refused_when_nothing_can_be_unloaded(models, model_bytes):
    budget = int(model_bytes * 1.5)
    with test_client(None, memory_budget=str(budget), prompt_cache_size=0) as client:
        assert load(client, "kept", models[0], pin=True).status_code == 200
        wait_loaded(client, "kept")
        refused = load(client, "more", models[1])
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "5"
        assert "pinned or has requests in flight" in refused.json()["error"]
        assert set(listing(client)) == {"default", "kept"}
        assert client.get("/api/model/status").status_code == 200  # the server goes on serving


def test_max_models_counts_models_not_bytes(models):
    with test_client(None, max_models=2) as client:
        for name, path in (("m0", models[0]), ("m1", models[1])):
            load(client, name, path)
            wait_loaded(client, name)
        chat(client, "m0")
        load(client, "m2", models[2])
        wait_loaded(client, "m2")
        assert set(listing(client)) == {"default", "m0", "m2"}


class CountingBackend(Backend):
    """The MLX backend, counting its loads."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.default_model = None
        self.loads: list[str] = []

    def load(self, model_name, adapter_path, progress):
        self.loads.append(model_name)
        time.sleep(0.3)  # a load that takes a while, so the second request arrives during it
        return self.inner.load(model_name, adapter_path, progress)


def test_a_request_naming_an_allowed_model_loads_it_once(models, tmp_path):
    counting = {}

    def backend(settings):
        counting["backend"] = CountingBackend(MlxBackend.from_settings(settings))
        return counting["backend"]

    allowed = str(models[2].parent / "*")
    with serving(None, backend=backend, allow_model=(allowed,)) as live:
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)

        def ask():
            return client.chat.completions.create(
                model=str(models[2]), messages=[{"role": "user", "content": "x"}], max_tokens=2
            )

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda _: ask(), range(2)))
        assert [answer.model for answer in answers] == [str(models[2])] * 2
        assert counting["backend"].loads == [str(models[2])]  # one load for both
        with pytest.raises(openai.NotFoundError, match="resident models"):
            client.chat.completions.create(
                model=str(tmp_path / "elsewhere"), messages=[{"role": "user", "content": "x"}]
            )


def test_loading_on_demand_needs_the_models_load_scope(models, tmp_path):
    keys = {"generate-only": "generate", "loader": "generate,models:load"}
    import subprocess
    import sys

    keys_file = tmp_path / "keys.json"
    made = {}
    for name, scopes in keys.items():
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "forgellm",
                "keys",
                "add",
                name,
                "--scopes",
                scopes,
                "--api-keys-file",
                str(keys_file),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        made[name] = result.stdout.strip()
    allowed = str(models[1].parent / "*")
    with test_client(None, plugins="auth", api_keys_file=str(keys_file), allow_model=(allowed,)) as client:
        body = {"model": str(models[1]), "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
        refused = client.post(
            "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {made['generate-only']}"}
        )
        assert refused.status_code == 404 and "models:load" in refused.json()["error"]["message"]
        loaded = client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {made['loader']}"})
        assert loaded.status_code == 200 and loaded.json()["model"] == str(models[1])


def test_an_idle_unpinned_model_is_unloaded_after_keep_alive(models):
    with test_client(None, keep_alive=1) as client:
        load(client, "brief", models[0])
        wait_loaded(client, "brief")
        assert chat(client, "brief").status_code == 200
        deadline = time.monotonic() + 10
        while "brief" in listing(client) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "brief" not in listing(client)


def test_memory_returns_to_its_level_after_unload(models):
    with test_client(None) as client:
        gc.collect()
        mx.clear_cache()
        before = mx.get_active_memory()
        load(client, "big", models[0])
        wait_loaded(client, "big")
        assert chat(client, "big", max_tokens=8).status_code == 200
        loaded = mx.get_active_memory()
        assert client.post("/api/models/unload", json={"name": "big"}).status_code == 200
        gc.collect()
        mx.clear_cache()
        after = mx.get_active_memory()
    assert loaded > before
    assert after - before < (loaded - before) * 0.1


def test_unload_of_an_unknown_name_is_a_404_in_the_guides_envelope(client):
    response = client.post("/api/models/unload", json={"name": "nope"})
    assert response.status_code == 404
    assert response.json()["success"] is False and "nope" in response.json()["error"]


def test_metrics_and_the_access_log_name_the_model(models, tmp_path):
    from test_metrics import scrape, value

    log = tmp_path / "access.log"
    with test_client(
        [f"a={models[0]}", f"b={models[1]}"], plugins="metrics,logging", access_log_file=str(log)
    ) as client:
        wait_loaded(client, "b")
        before = scrape(client)
        assert chat(client, "b", max_tokens=3).status_code == 200
        assert chat(client, "a", max_tokens=2).status_code == 200
        after = scrape(client)
        assert client.get("/readyz").status_code == 200  # ready while the default model serves
    for name, tokens in (("b", 3), ("a", 2)):
        grown = value(after, "forgellm_model_generated_tokens_total", model=name) - value(
            before, "forgellm_model_generated_tokens_total", model=name
        )
        assert grown == tokens
        assert value(after, "forgellm_model_memory_bytes", model=name) > 0
        assert value(after, "forgellm_model_loaded_seconds", model=name) > 0
    assert value(after, "forgellm_memory_in_use_bytes") >= value(after, "forgellm_model_memory_bytes", model="a")
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    generations = [entry for entry in entries if entry["path"] == "/v1/chat/completions"]
    assert [entry["model"] for entry in generations] == ["b", "a"]


def test_the_guides_load_makes_a_resident_model_the_default(models):
    with test_client([f"a={models[0]}", f"b={models[1]}"]) as client:
        wait_loaded(client, "b")
        response = client.post("/api/model/load", json={"model_name": str(models[1])})
        assert response.status_code == 200
        status = client.get("/api/model/status").json()
        assert status["loaded"] and status["model_name"] == str(models[1])
        assert listing(client)["b"]["default"] and not listing(client)["a"]["default"]
        generated = client.post("/api/model/generate", json={"prompt": "Hi", "max_tokens": 2})
        assert generated.status_code == 200


@pytest.mark.parametrize(("limit", "reused"), [(0, True), (1, False)])
def test_prompt_cache_bytes_bounds_each_models_prompt_cache(models, limit, reused):
    # 0: bounded by entries only, so a repeated prompt reuses its KV; 1 byte: nothing fits, nothing is kept.
    with test_client(models[0], prompt_cache_bytes=limit) as client:
        ask = {"messages": [{"role": "user", "content": "the same prompt twice"}], "max_tokens": 2}
        client.post("/v1/chat/completions", json=ask)
        again = client.post("/v1/chat/completions", json=ask).json()
    assert (again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0) is reused


def test_forgellm_run_serves_two_named_models_concurrently_through_the_openai_client(models):
    from forgellm.testing import ServerProcess

    args = ["--model", f"a={models[0]}", "--model", f"b={models[1]}", "--memory-budget", "1GiB"]
    with ServerProcess(args) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        deadline = time.monotonic() + 60
        while len(client.models.list().data) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)

        def ask(name: str):
            return client.chat.completions.create(
                model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=20, temperature=0
            )

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(ask, ["a", "b", "a", "b"]))
        assert [answer.model for answer in answers] == ["a", "b"] * 2  # the names they are served as
        assert answers[0].choices[0].message.content == answers[2].choices[0].message.content  # greedy, same model
        listing_ = httpx.get(f"{server.url}/api/models").json()
        assert listing_["memory_budget"] == 2**30 and listing_["memory_in_use"] <= 2**30
