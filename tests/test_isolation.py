"""One request must never fail or slow the others past their share (issue 20's red-team findings).

Each finding is replayed through the real HTTP interface: a chat_template_kwargs that changed what the
template call did, a row whose own processing fails inside the shared batch step, amplification by
``n``, fairness between clients, a timeout that used to discard the text, and on-demand loads keyed by
spelling.
"""

from __future__ import annotations

import concurrent.futures
import inspect

import pytest
from faulty_backend import ROW_FAULT, ROW_FAULT_MESSAGE, Faults
from live_server import idle, wait_for
from transformers import PreTrainedTokenizerBase
from wire import sse

from forgellm.core.api.template_variables import APPLY_KEYWORDS
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

VICTIM_TOKENS = 40


@pytest.fixture(scope="module")
def faults():
    return Faults(step_fault=False)


@pytest.fixture(scope="module")
def faulty(tiny_model, faults):
    with test_client(tiny_model, backend=faults.backend, max_concurrency=4, max_tokens_cap=50_000) as client:
        yield client


def test_a_row_whose_processing_fails_ends_alone_and_the_batch_goes_on(faulty, faults):
    scheduler = faulty.app.state.server.scheduler
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
    from forgellm.backends.mlx import MlxBackend
    from forgellm.core.engine.generation import GenerationJob

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
    import httpx
    from live_server import serving

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
