"""Faults: a backend that fails mid-batch, a model that cannot load, and clients that walk away.

Each fault is contained: the requests it touched fail with a 500 in their route's error shape
(in-band, once a stream has begun), everything queued or sent later is served, and the server stays
ready. The backend faults come from tests/faulty_backend.py: the real MLX backend, with faults the
tests switch on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import random
import shutil

import httpx
import pytest
from faulty_backend import (
    ADD_FAULT,
    ADD_FAULT_MESSAGE,
    REMOVE_FAULT,
    STEP_FAULT,
    STEP_FAULT_MESSAGE,
    Faults,
)
from live_server import idle, serving, wait_for
from wire import ndjson, sse

from forgellm.testing import test_client, wait_until_loaded

# Far more tokens than any test waits for: such a generation ends only by a fault or a disconnect.
ENDLESS = 50_000
SERVED_TOKENS = 8


def assert_ready(client) -> None:
    readiness = client.get("/readyz")
    assert readiness.status_code == 200, readiness.text
    assert readiness.json()["ready"] is True


# -- the backend fails --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def faults():
    return Faults(step_fault=False)


@pytest.fixture(scope="module")
def faulty_server(tiny_model, faults):
    """Two decode slots, so a test can line up exactly who shares the batch and who waits."""
    with test_client(
        tiny_model,
        backend=faults.backend,
        max_concurrency=2,
        max_queue=8,
        max_tokens_cap=ENDLESS,
    ) as client:
        yield client


@pytest.fixture()
def scheduler(faulty_server, faults):
    scheduler = faulty_server.app.state.server.default_model.scheduler
    yield scheduler
    faults.step_fault.clear()
    wait_for(lambda: idle(scheduler), "the server to be idle after the test")


def test_a_failed_engine_step_fails_its_batch_and_nothing_queued_or_later(faulty_server, faults, scheduler):
    send = concurrent.futures.ThreadPoolExecutor(4)
    # In the batch: a plain request, and a stream whose sequence will break the step they share.
    victim = send.submit(
        faulty_server.post, "/api/model/generate", json={"prompt": "Once upon a time", "max_tokens": ENDLESS}
    )
    breaker = send.submit(
        faulty_server.post,
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": f"Hello {STEP_FAULT}"}], "max_tokens": ENDLESS, "stream": True},
    )
    wait_for(lambda: scheduler.active_count == 2, "both to be generating")
    # Queued behind them: one plain request and one stream.
    queued_plain = send.submit(
        faulty_server.post, "/v1/completions", json={"prompt": "The quick brown fox", "max_tokens": SERVED_TOKENS}
    )
    queued_stream = send.submit(
        faulty_server.post,
        "/api/model/generate",
        json={"prompt": "Servers load models", "max_tokens": SERVED_TOKENS, "streaming": True},
    )
    wait_for(lambda: scheduler.waiting_count == 2, "two requests to be queued")

    faults.step_fault.set()

    failed = victim.result(timeout=60)
    assert failed.status_code == 500
    assert failed.json() == {"success": False, "error": f"Generation failed: {STEP_FAULT_MESSAGE}"}
    broken_stream = breaker.result(timeout=60)
    assert broken_stream.status_code == 200  # the stream had begun: the failure is reported in-band
    *_, error, done = sse(broken_stream)
    assert done == "[DONE]"
    assert error["error"]["code"] == "generation_failed"
    assert STEP_FAULT_MESSAGE in error["error"]["message"]

    served = queued_plain.result(timeout=60)
    assert served.status_code == 200, served.text
    assert served.json()["usage"]["completion_tokens"] == SERVED_TOKENS
    streamed = queued_stream.result(timeout=60)
    assert streamed.status_code == 200
    assert ndjson(streamed)[-1]["type"] == "complete"
    assert ndjson(streamed)[-1]["completion_tokens"] == SERVED_TOKENS
    send.shutdown()

    later = faulty_server.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": SERVED_TOKENS}
    )
    assert later.status_code == 200
    assert later.json()["usage"]["completion_tokens"] == SERVED_TOKENS
    assert_ready(faulty_server)


def test_a_sequence_the_engine_refuses_fails_alone(faulty_server, scheduler):
    send = concurrent.futures.ThreadPoolExecutor(3)
    running = send.submit(
        faulty_server.post, "/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 1000}
    )
    wait_for(lambda: scheduler.active_count == 1, "the first request to be generating")

    refused_guide = faulty_server.post("/api/model/generate", json={"prompt": f"Hi {ADD_FAULT}", "max_tokens": 4})
    refused_openai = faulty_server.post("/v1/completions", json={"prompt": f"Hi {ADD_FAULT}", "max_tokens": 4})

    assert not running.done(), "make the running request longer: it ended before the refusals"
    assert refused_guide.status_code == 500
    assert refused_guide.json() == {"success": False, "error": f"Generation failed: {ADD_FAULT_MESSAGE}"}
    assert refused_openai.status_code == 500
    assert refused_openai.json()["error"] == {
        "message": f"Generation failed: {ADD_FAULT_MESSAGE}",
        "type": "server_error",
        "param": None,
        "code": "generation_failed",
    }
    finished = running.result(timeout=60)
    assert finished.status_code == 200
    assert finished.json()["usage"]["completion_tokens"] == 1000
    send.shutdown()
    assert_ready(faulty_server)


# The engine thread survives every engine call that fails: a failed remove() (a stop string reached, a
# client gone) is handled as a failed step, and a failed close() (a model swap) is logged and passed over.


@pytest.fixture()
def own_faulty_server(tiny_model):
    """A server of its own (these faults break its engine), with a short timeout so a hang would end."""
    faults = Faults(step_fault=False)
    with test_client(tiny_model, backend=faults.backend, request_timeout=2) as client:
        yield client, faults


def test_an_engine_that_fails_to_remove_a_sequence_keeps_serving(own_faulty_server):
    client, _ = own_faulty_server
    body = {"prompt": f"Once upon a time {REMOVE_FAULT}", "max_tokens": SERVED_TOKENS, "temperature": 0}
    text = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    # Greedy, so the same request generates the same text: a stop string from inside it is reached,
    # and the scheduler removes the sequence from the batch.
    stopped = client.post("/v1/completions", json={**body, "stop": text[2:5]})

    assert stopped.status_code == 200, stopped.text  # its text was complete before the removal failed
    assert stopped.json()["choices"][0]["finish_reason"] == "stop"
    later = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": SERVED_TOKENS})
    assert later.status_code == 200, later.text
    assert_ready(client)


def test_an_engine_that_fails_to_close_does_not_wedge_the_next_load(own_faulty_server, tiny_model):
    client, faults = own_faulty_server
    faults.close_fault.set()
    assert client.post("/api/model/load", json={"model_name": str(tiny_model)}).status_code == 200

    status = wait_until_loaded(client, timeout=3)  # the tiny model loads in well under a second

    faults.close_fault.clear()
    assert status["loaded"] is True, status
    assert client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": SERVED_TOKENS}).status_code == 200
    assert_ready(client)


# -- the model cannot load ---------------------------------------------------------------------
# tests/test_model_loading.py loads broken models into a running server; here the server starts on one,
# as `forgellm run --model` would, and must stay up to be given a good model.


def corrupt_weights(model_dir):
    (model_dir / "model.safetensors").write_bytes(b"\x00 not a safetensors file" * 16)


def missing_weights(model_dir):
    (model_dir / "model.safetensors").unlink()


@pytest.mark.parametrize("damage", [corrupt_weights, missing_weights])
def test_a_server_started_on_broken_weights_reports_it_and_stays_up(tiny_model, tmp_path, damage):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    damage(broken)
    with test_client(broken, wait_for_model=False) as client:
        status = wait_until_loaded(client)
        assert status["loaded"] is False and status["model_name"] == str(broken)
        assert status["error"] and "Traceback" not in status["error"]
        assert client.get("/healthz").status_code == 200  # alive
        readiness = client.get("/readyz")
        assert readiness.status_code == 503 and readiness.json()["model_loaded"] is False
        assert client.post("/api/model/generate", json={"prompt": "Hi"}).json() == {
            "success": False,
            "error": "No model loaded",
        }

        assert client.post("/api/model/load", json={"model_name": str(tiny_model)}).status_code == 200
        assert wait_until_loaded(client)["loaded"] is True
        assert_ready(client)


# -- clients walk away -------------------------------------------------------------------------


STREAMS = [
    ("/v1/completions", {"prompt": "Once upon a time", "max_tokens": ENDLESS, "stream": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": ENDLESS, "stream": True}),
    ("/api/model/generate", {"prompt": "Once upon a time", "max_tokens": ENDLESS, "streaming": True}),
]
CLIENTS = 100


async def streams_then_walk_away(url: str, scheduler) -> list[int]:
    """CLIENTS endless streams, some generating and some queued; each client hangs up mid-stream."""
    everyone_streaming = asyncio.Event()
    statuses = []

    async def client(number: int) -> None:
        path, body = STREAMS[number % len(STREAMS)]
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:  # one connection each
            async with http.stream("POST", path, json=body) as response:
                statuses.append(response.status_code)
                await everyone_streaming.wait()
                if number % 2:  # half read some of the stream first (those in the batch get text)
                    async for _ in response.aiter_bytes():
                        break
                await asyncio.sleep(random.random() * 0.2)  # then all hang up, in no particular order

    tasks = [asyncio.create_task(client(number)) for number in range(CLIENTS)]
    while scheduler.in_flight < CLIENTS:  # every one admitted: generating or waiting for a slot
        await asyncio.sleep(0.01)
    everyone_streaming.set()
    await asyncio.gather(*tasks)
    return statuses


def test_a_hundred_clients_that_hang_up_mid_stream_leave_nothing_behind(tiny_model):
    with serving(
        tiny_model, max_concurrency=8, max_queue=CLIENTS, max_tokens_cap=ENDLESS, max_inflight_per_client=CLIENTS
    ) as live:  # one address plays all the clients
        url, scheduler = live.url, live.scheduler
        statuses = asyncio.run(asyncio.wait_for(streams_then_walk_away(url, scheduler), timeout=120))
        assert statuses == [200] * CLIENTS

        wait_for(lambda: idle(scheduler), "every sequence to leave the batch and the queue")
        assert (scheduler.in_flight, scheduler.active_count, scheduler.waiting_count) == (0, 0, 0)
        # Every slot is free again: a full batch of new requests is served at once.
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            after = list(
                pool.map(
                    lambda n: httpx.post(
                        f"{url}/v1/completions", json={"prompt": f"Client {n}", "max_tokens": 4}, timeout=60
                    ),
                    range(8),
                )
            )
        assert [r.status_code for r in after] == [200] * 8
        assert idle(scheduler)
