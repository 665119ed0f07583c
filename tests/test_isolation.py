"""One request must never fail or slow the others past their share (issue 20's red-team findings).

Each finding is replayed through the real HTTP interface: a chat_template_kwargs that changed what the
template call did, a row whose own processing fails inside the shared batch step, amplification by
``n``, fairness between clients, a timeout that used to discard the text, and on-demand loads keyed by
spelling.
"""

from __future__ import annotations

import concurrent.futures
import inspect
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import httpx
import jwt
import pytest
from faulty_backend import ROW_FAULT, ROW_FAULT_MESSAGE, Faults
from live_server import idle, serving, wait_for
from transformers import PreTrainedTokenizerBase
from wire import sse

from forgellm.backends.mlx import MlxBackend
from forgellm.core.api.template_variables import APPLY_KEYWORDS
from forgellm.core.engine.generation import GenerationJob
from forgellm.plugins.responses.store import ResponseStore, StoredResponse
from forgellm.testing import test_client

CHAT = "/v1/chat/completions"


def chat(content: str, **fields) -> dict:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 8, "temperature": 0, **fields}


# -- chat_template_kwargs are data, not code ------------------------------------------------------


@pytest.mark.parametrize(
    ("variables", "named"),
    [
        ({"tokenize": False}, "tokenize"),
        ({"chat_template": "{{ 'x' * 3000000000 }}"}, "chat_template"),
        ({"return_tensors": "np"}, "return_tensors"),
        ({"return_dict": True}, "return_dict"),
        ({"return_anything_new": 1}, "return_anything_new"),
        ({"add_generation_prompt": False}, "add_generation_prompt"),
        ({"continue_final_message": True}, "continue_final_message"),
        ({"messages": []}, "messages"),
        ({"bos_token": "<evil>"}, "bos_token"),
        ({"tokenizer_kwargs": {"padding": True}}, "tokenizer_kwargs"),
        ({"not a name": 1}, "not a name"),
    ],
)
def test_template_keywords_are_refused_by_name(client, variables, named):
    answer = client.post(CHAT, json=chat("Hello", chat_template_kwargs=variables))
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert named in error["message"]


def test_template_variables_are_bounded_in_size_and_depth(client):
    too_big = client.post(CHAT, json=chat("Hello", chat_template_kwargs={"notes": "x" * 5000}))
    assert too_big.status_code == 400 and "bytes" in too_big.json()["error"]["message"]
    too_deep = client.post(CHAT, json=chat("Hello", chat_template_kwargs={"deep": [[[[["x"]]]]]}))
    assert too_deep.status_code == 400 and "nests" in too_deep.json()["error"]["message"]
    too_many = client.post(CHAT, json=chat("Hello", chat_template_kwargs={f"v{i}": i for i in range(17)}))
    assert too_many.status_code == 400 and "variables" in too_many.json()["error"]["message"]


def test_plain_template_variables_still_reach_the_template(client):
    answer = client.post(CHAT, json=chat("Hello", chat_template_kwargs={"enable_thinking": False, "note": "hi"}))
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] > 0


def test_every_keyword_of_apply_chat_template_is_refused():
    # A transformers upgrade that adds a keyword must not let it through unnoticed.
    parameters = inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters
    keywords = {name for name, p in parameters.items() if name != "self" and p.kind is not p.VAR_KEYWORD}
    assert keywords <= APPLY_KEYWORDS | {name for name in keywords if name.startswith("return_")}


# -- a failure in one row's own processing ends that row alone ------------------------------------

VICTIM_TOKENS = 200  # long enough that all three share the batch however the machine is loaded


@pytest.fixture(scope="module")
def faults():
    return Faults(step_fault=False)


@pytest.fixture(scope="module")
def faulty(tiny_model, faults):
    with test_client(tiny_model, backend=faults.backend, max_concurrency=4, max_tokens_cap=50_000) as client:
        yield client


def test_a_row_whose_processing_fails_ends_alone_and_the_batch_goes_on(faulty, faults):
    scheduler = faulty.app.state.server.default_model.scheduler
    prompts = ["Once upon a time", "The quick brown fox"]
    alone = [faulty.post(CHAT, json=chat(p, max_tokens=VICTIM_TOKENS)).json() for p in prompts]
    expected = [answer["choices"][0]["message"]["content"] for answer in alone]

    with concurrent.futures.ThreadPoolExecutor(3) as send:
        breaker = send.submit(faulty.post, CHAT, json=chat(f"Hi {ROW_FAULT}", max_tokens=50_000, stream=True))
        victims = [send.submit(faulty.post, CHAT, json=chat(p, max_tokens=VICTIM_TOKENS)) for p in prompts]
        wait_for(lambda: scheduler.active_count == 3, "all three to share the batch")
        steps_before = scheduler.steps
        faults.row_fault.set()
        try:
            broken = breaker.result(timeout=60)
            answers = [victim.result(timeout=60) for victim in victims]
        finally:
            faults.row_fault.clear()
    assert broken.status_code == 200  # a stream: the failure is reported in-band
    *_, error, done = sse(broken)
    assert done == "[DONE]" and ROW_FAULT_MESSAGE in error["error"]["message"]
    for answer, text in zip(answers, expected, strict=True):
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"] == text
        assert answer.json()["usage"]["completion_tokens"] == VICTIM_TOKENS
    assert scheduler.steps > steps_before
    wait_for(lambda: idle(scheduler), "the server to be idle")


def test_a_prompt_that_is_not_token_ids_fails_alone(tiny_model):
    # What tokenize=false used to do: a string reached the engine, and the prefill pass failed for every row.

    model = MlxBackend().load(str(tiny_model), None, lambda _: None)
    engine = model.create_engine(4)
    with pytest.raises(ValueError, match="not a token id"):
        engine.add(1, GenerationJob(prompt_tokens="<|user|>hi", max_tokens=4))  # type: ignore[arg-type]
    engine.add(2, GenerationJob(prompt_tokens=model.encode("hello"), max_tokens=4))
    outputs = []
    while len(outputs) < 4:
        outputs += engine.step()
    assert all(output.seq_id == 2 and output.error is None for output in outputs)
    engine.close()


# -- every route that costs work passes the same limits --------------------------------------------

COUNT = "/v1/messages/count_tokens"
ASK = {"model": "any", "messages": [{"role": "user", "content": "Hello there"}]}


def test_count_tokens_spends_the_request_budget(tiny_model):
    # Before: a 5/minute key got 12 of 12 counts after its limit was spent.
    with test_client(tiny_model, plugins="anthropic,ratelimit", rate_limit="5/minute") as client:
        codes = [client.post(COUNT, json={**ASK, "model": str(tiny_model)}).status_code for _ in range(8)]
        assert codes == [200] * 5 + [429] * 3
        refused = client.post(COUNT, json={**ASK, "model": str(tiny_model)})
        assert refused.json()["type"] == "error"
        assert refused.json()["error"]["type"] == "rate_limit_error"
        assert int(refused.headers["Retry-After"]) >= 1


def test_count_tokens_counts_against_the_in_flight_limit(tiny_model):

    settings = {"plugins": "anthropic", "max_inflight_per_client": 1, "max_tokens_cap": 50_000}
    with serving(tiny_model, **settings) as live, httpx.Client(base_url=live.url, timeout=30) as http:
        body = {"prompt": "hello", "max_tokens": 50_000, "streaming": True}
        with http.stream("POST", "/api/model/generate", json=body) as running:
            lines = running.iter_lines()
            assert next(lines)  # generating
            refused = http.post(COUNT, json={**ASK, "model": str(tiny_model)})
        assert refused.status_code == 429, refused.text
        wait_for(lambda: idle(live.scheduler), "the stream to end")
        assert http.post(COUNT, json={**ASK, "model": str(tiny_model)}).status_code == 200


# -- bounded amplification: n times max_tokens, n slots in flight, rows shared fairly ----------------


def test_n_times_max_tokens_past_the_request_budget_is_refused(client):
    # Before: n=16 with max_tokens=4096 was accepted, 65,536 tokens from one request.
    answer = client.post(CHAT, json=chat("Hello", n=16, max_tokens=4096))
    assert answer.status_code == 400
    assert "16 choice(s)" in answer.json()["error"]["message"]
    assert "limit is 8192" in answer.json()["error"]["message"]
    assert client.post(CHAT, json=chat("Hello", n=16, max_tokens=512)).status_code == 200


def test_choices_without_max_tokens_share_the_request_budget(tiny_model):
    with test_client(tiny_model, max_request_tokens=12, max_tokens_cap=12) as client:
        answer = client.post(CHAT, json={"messages": [{"role": "user", "content": "Hello"}], "n": 4})
        assert answer.status_code == 200, answer.text
        assert all(choice["finish_reason"] in ("length", "stop") for choice in answer.json()["choices"])
        assert answer.json()["usage"]["completion_tokens"] <= 12
        one = client.post("/v1/completions", json={"prompt": "Hello"}).json()  # its own default (16) fits
        assert one["usage"]["completion_tokens"] <= 12


def test_each_choice_counts_against_the_in_flight_limit(tiny_model):
    with test_client(tiny_model, max_inflight_per_client=2) as client:
        refused = client.post(CHAT, json=chat("Hello", n=3))
        assert refused.status_code == 429
        assert client.post(CHAT, json=chat("Hello", n=2)).status_code == 200


FAIR_TOKENS = 40
# The hog's rows run long enough that the victim always arrives while the hog's later rows still queue.
HOG_TOKENS = 400


def test_a_client_with_many_rows_does_not_make_another_wait_behind_them(tiny_model):

    keys = ("key-of-the-hog", "key-of-the-victim")
    settings = {"plugins": "auth", "api_key": keys, "max_concurrency": 2}
    with serving(tiny_model, **settings) as live:
        body = {"prompt": "Once upon a time", "max_tokens": FAIR_TOKENS, "temperature": 0}
        finished: dict[str, float] = {}

        def send(key: str, fields: dict) -> httpx.Response:
            headers = {"Authorization": f"Bearer {key}"}
            answer = httpx.post(f"{live.url}/v1/completions", json={**body, **fields}, headers=headers, timeout=60)
            finished[key] = time.monotonic()
            return answer

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            hog = pool.submit(send, keys[0], {"n": 6, "max_tokens": HOG_TOKENS})  # three waves of two rows
            wait_for(lambda: live.scheduler.waiting_count == 4, "the hog's rows to fill the batch and queue")
            victim = pool.submit(send, keys[1], {})
            wait_for(lambda: live.scheduler.waiting_count == 5, "the victim to queue")
            assert hog.result(timeout=60).status_code == 200
            assert victim.result(timeout=60).status_code == 200
        # In arrival order the victim would run in the fourth wave, after every one of the hog's rows.
        assert finished[keys[1]] < finished[keys[0]]


def test_max_rows_per_client_caps_one_clients_rows_even_with_rows_free(tiny_model):

    settings = {"max_concurrency": 8, "max_rows_per_client": 2, "max_tokens_cap": 50_000, "max_request_tokens": 0}
    with serving(tiny_model, **settings) as live:
        body = {"prompt": "Once upon a time", "max_tokens": 50_000, "n": 4, "stream": True}
        with httpx.Client(base_url=live.url, timeout=60) as http, http.stream("POST", "/v1/completions", json=body):
            wait_for(lambda: live.scheduler.active_count == 2, "two rows to run")
            wait_for(lambda: live.scheduler.waiting_count == 2, "two rows to wait")
            assert live.scheduler.active_count == 2  # six rows free, and still two
        wait_for(lambda: idle(live.scheduler), "the stream to end")


# -- one resident per model, whatever its spelling; failed loads hold nothing ---------------------


@pytest.fixture()
def models_dir(tiny_model, tmp_path):
    (tmp_path / "smol").symlink_to(tiny_model, target_is_directory=True)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama"}')  # no weights, no tokenizer
    return tmp_path


def test_spellings_of_one_directory_share_one_resident(models_dir):
    # Before: models//smol, models/./smol, models/smol/ and four more spellings gave 7 resident copies.
    spellings = ["smol", "/smol", "//smol", "/./smol", "/smol/", "/../" + models_dir.name + "/smol"]
    with test_client(allow_model=(f"{models_dir}/*",)) as client:
        for spelling in spellings:
            answer = client.post(CHAT, json=chat("Hello", model=f"{models_dir}/{spelling}"))
            assert answer.status_code == 200, (spelling, answer.text)
        listing = client.get("/api/models").json()["models"]
        loaded = [model for model in listing if model["state"] == "loaded"]
        assert len(loaded) == 1
        server = client.app.state.server
        assert sum(resident.scheduler.alive for resident in server.registry.residents) == 2  # the default slot too


def test_a_failed_load_on_demand_says_why_and_leaves_no_thread(models_dir):
    with test_client(allow_model=(f"{models_dir}/*",), model_load_wait=30) as client:
        server = client.app.state.server
        threads_before = sum(resident.scheduler.alive for resident in server.registry.residents)
        answer = client.post(CHAT, json=chat("Hello", model=f"{models_dir}/broken"))
        assert answer.status_code == 404, answer.text
        message = answer.json()["error"]["message"]
        assert f"'{models_dir}/broken' could not be loaded" in message and message != "No model loaded"
        wait_for(
            lambda: sum(r.scheduler.alive for r in server.registry.residents) == threads_before,
            "the failed load's engine thread to end",
            timeout=10,
        )
        again = client.post(CHAT, json=chat("Hello", model=f"{models_dir}/broken"))
        assert again.status_code == 404 and "could not be loaded" in again.json()["error"]["message"]
        missing = client.post(CHAT, json=chat("Hello", model=f"{models_dir}/absent"))
        assert missing.status_code == 400 and "not found" in missing.json()["error"]["message"]
        assert sum(r.scheduler.alive for r in server.registry.residents) == threads_before


def test_a_clients_load_error_does_not_map_the_disk(tmp_path):
    # Before: /api/models/load answered FileNotFoundError ... '/etc/config.json', a file-system probe.
    with test_client() as client:
        answer = client.post("/api/models/load", json={"model_name": "/etc", "name": "probe"})
        assert answer.status_code == 200  # a directory that exists: the load starts, and fails
        wait_for(
            lambda: client.get("/api/models").json()["models"][-1]["state"] == "failed", "the load to fail", timeout=30
        )
        error = client.get("/api/models").json()["models"][-1]["error"]
        assert error == "Model /etc was not found or is not loadable"
        retried = client.post("/api/models/load", json={"model_name": "/etc", "name": "probe"})
        assert retried.status_code == 200  # a failed load's name is free again


# -- the cheap Lows -------------------------------------------------------------------------------


def test_a_refused_keys_file_stops_the_server_with_one_line_not_a_traceback(tmp_path):

    keys = tmp_path / "keys.json"
    keys.write_text("{}")
    keys.chmod(0o666)
    env = {**os.environ, "FORGELLM_NO_MODEL": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "forgellm", "run", "--port", "0", "--plugins", "auth"]
    ran = subprocess.run([*command, "--api-keys-file", str(keys)], env=env, capture_output=True, text=True, timeout=60)
    assert ran.returncode == 3
    assert "cannot start: auth plugin: keys file" in ran.stderr and "chmod go-w" in ran.stderr
    assert "Traceback" not in ran.stderr


def test_responses_405_is_openais_invalid_request_error(tiny_model):
    with test_client(tiny_model, plugins="responses") as client:
        answer = client.get("/v1/responses")
        assert answer.status_code == 405
        assert answer.json()["error"]["type"] == "invalid_request_error"


def test_metadata_is_bounded_as_openai_bounds_it(tiny_model):
    with test_client(tiny_model, plugins="responses") as client:
        body = {"input": "x", "max_output_tokens": 2}
        too_long = client.post("/v1/responses", json={**body, "metadata": {"k": "v" * 513}})
        assert too_long.status_code == 400
        too_many = client.post("/v1/responses", json={**body, "metadata": {f"k{i}": "v" for i in range(17)}})
        assert too_many.status_code == 400
        assert client.post("/v1/responses", json={**body, "metadata": {"k": "v" * 512}}).status_code == 200


def test_one_clients_many_responses_evict_its_own_not_anothers():
    # Before: another key's 260 requests evicted a client's stored response from the one shared LRU.

    def stored(owner: str, number: int) -> StoredResponse:
        return StoredResponse(owner, SimpleNamespace(id=f"{owner}-{number}"), [])  # type: ignore[arg-type]

    store = ResponseStore(capacity=8)
    store.put(stored("patient", 0))
    for number in range(260):
        store.put(stored("greedy", number))
    assert store.get("patient-0", "patient") is not None
    assert store.get("greedy-259", "greedy") is not None and store.get("greedy-0", "greedy") is None
    assert len(store) == 8


def test_state_shows_the_settings_to_administrators_only(tiny_model):

    secret = "hs256-secret-for-the-tests-0123456789abcdef"
    now = int(time.time())
    token = jwt.encode({"sub": "reader", "exp": now + 600, "iat": now}, secret, algorithm="HS256")
    with test_client(tiny_model, plugins="auth,console", api_key=("admin-key",), jwt_secret=secret) as client:
        unscoped = client.get("/console/api/state", headers={"Authorization": f"Bearer {token}"})
        assert unscoped.status_code == 200 and unscoped.json()["config"] is None
        admin = client.get("/console/api/state", headers={"Authorization": "Bearer admin-key"})
        assert admin.json()["config"]["max_concurrency"] == 32


def test_a_schema_no_value_satisfies_is_a_400_not_an_empty_answer(client):
    cycle = {"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/a"}}}
    format = {"type": "json_schema", "json_schema": {"name": "loop", "schema": cycle}}
    answer = client.post(CHAT, json=chat("Hello", response_format=format))
    assert answer.status_code == 400
    assert "no JSON value satisfies it" in answer.json()["error"]["message"]
