"""Admission and lifecycle: the bounded queue, prompt limits, disconnects, timeouts, and models that cannot batch.

These tests need clients that hold a stream open or hang up mid-request, which Litestar's
TestClient cannot do, so the app runs under uvicorn on a real socket in a thread of the
test process; its scheduler stays reachable for the counters the assertions read.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import socket
from collections.abc import Iterator

import httpx
import pytest
from faulty_backend import Faults
from live_server import LiveServer, idle, serving, wait_for

# Far more tokens than any test waits for: a sequence that is still running is one that was not stopped.
ENDLESS = 50_000


@pytest.fixture(scope="module")
def server(tiny_model):
    """One decode slot and one queue place, so two requests fill the server."""
    with serving(tiny_model, max_tokens_cap=ENDLESS, max_concurrency=1, max_queue=1, max_prompt_tokens=64) as live:
        yield live


@pytest.fixture()
def http(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client
    wait_for(lambda: idle(server.scheduler), "the server to be idle after the test")


@contextlib.contextmanager
def open_stream(server: LiveServer, path: str = "/v1/completions", body: dict | None = None) -> Iterator[Iterator[str]]:
    """A streamed generation that runs until the block ends, on its own connection; yields its non-empty lines.

    The one line iterator must be kept: closing an httpx line iterator closes the connection.
    """
    body = body or {"prompt": "Once upon a time", "max_tokens": ENDLESS, "stream": True}
    with httpx.Client(base_url=server.url, timeout=30) as client, client.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        yield (line for line in response.iter_lines() if line)


def test_full_queue_is_refused_at_once_with_retry_after(server, http):
    scheduler = server.scheduler
    with open_stream(server) as running:
        next(running)  # generating: it holds the one decode slot
        with open_stream(server):  # holds the one queue place
            wait_for(lambda: scheduler.in_flight == 2, "the second request to be queued")
            bodies = {
                "/v1/completions": {"prompt": "hi", "max_tokens": 4},
                "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
                "/api/model/generate": {"prompt": "hi", "max_tokens": 4},
            }
            paths = ["/v1/completions", "/v1/chat/completions", "/v1/completions", "/api/model/generate"]
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                refusals = list(pool.map(lambda path: http.post(path, json=bodies[path]), paths))
            # Refused while both admitted requests were still generating: nobody waited for a slot.
            assert scheduler.in_flight == 2
            assert scheduler.active_count == 1
    for response in refusals:
        assert response.status_code == 503
        assert int(response.headers["retry-after"]) >= 1
    assert [r.json()["error"]["type"] for r in refusals[:3]] == ["server_overloaded"] * 3
    assert refusals[3].json() == {"success": False, "error": "Server is at capacity; retry shortly"}


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"prompt": "word " * 100}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 100}]}),
        ("/api/model/generate", {"prompt": "word " * 100}),
    ],
)
def test_prompt_over_max_prompt_tokens_is_400(http, path, body):
    response = http.post(path, json=body)
    assert response.status_code == 400
    payload = response.json()
    message = payload["error"]["message"] if path.startswith("/v1") else payload["error"]
    assert "the limit is 64" in message


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"prompt": "Once upon a time", "max_tokens": ENDLESS, "stream": True}),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": ENDLESS, "stream": True},
        ),
        ("/api/model/generate", {"prompt": "Once upon a time", "max_tokens": ENDLESS, "streaming": True}),
    ],
)
def test_streaming_client_that_disconnects_leaves_the_batch(server, http, path, body):
    scheduler = server.scheduler
    with open_stream(server, path, body) as lines:
        next(lines)
        wait_for(lambda: scheduler.active_count == 1, "the stream to be generating")
        steps_at_disconnect = scheduler.steps
    wait_for(lambda: idle(scheduler), "the sequence to leave the batch")
    assert scheduler.steps - steps_at_disconnect < 100  # stopped, not run on towards max_tokens
    # The one decode slot is free again.
    assert http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3}).status_code == 200


def send_without_reading(server: LiveServer, path: str, body: dict) -> socket.socket:
    """A raw HTTP request whose client will hang up without reading the answer."""
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode()
    connection = socket.create_connection(("127.0.0.1", server.port))
    connection.sendall(head + payload)
    return connection


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"prompt": "Once upon a time", "max_tokens": ENDLESS}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": ENDLESS}),
        ("/api/model/generate", {"prompt": "Once upon a time", "max_tokens": ENDLESS}),
    ],
)
def test_non_streaming_client_that_disconnects_leaves_the_batch(server, http, path, body):
    scheduler = server.scheduler
    connection = send_without_reading(server, path, body)
    wait_for(lambda: scheduler.active_count == 1, "the request to be generating")
    steps_at_disconnect = scheduler.steps
    connection.close()
    wait_for(lambda: idle(scheduler), "the sequence to leave the batch")
    assert scheduler.steps - steps_at_disconnect < 100
    assert http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3}).status_code == 200


def test_queued_client_that_disconnects_gives_up_its_place(server, http):
    scheduler = server.scheduler
    with open_stream(server) as running:
        next(running)
        connection = send_without_reading(server, "/v1/completions", {"prompt": "hi", "max_tokens": 3})
        wait_for(lambda: scheduler.in_flight == 2, "the second request to be queued")
        connection.close()
        wait_for(lambda: scheduler.in_flight == 1 and scheduler.waiting_count == 0, "the queued request to leave")
        assert scheduler.active_count == 1  # the running stream is untouched


@pytest.fixture(scope="module")
def impatient_server(tiny_model):
    with serving(tiny_model, max_tokens_cap=ENDLESS, request_timeout=0.5) as live:
        yield live


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"prompt": "Once upon a time", "max_tokens": ENDLESS}),
        ("/api/model/generate", {"prompt": "Once upon a time", "max_tokens": ENDLESS}),
    ],
)
def test_request_timeout_stops_the_sequence_and_keeps_its_text(impatient_server, path, body):
    # Before: a 504 that discarded everything generated until the timeout.
    scheduler = impatient_server.scheduler
    response = httpx.post(impatient_server.url + path, json=body, timeout=30)
    assert response.status_code == 200, response.text
    payload = response.json()
    if path.startswith("/v1"):
        assert payload["choices"][0]["finish_reason"] == "timeout"
        assert payload["choices"][0]["text"] and payload["usage"]["completion_tokens"] > 0
    else:
        assert payload["finish_reason"] == "timeout"
        assert payload["text"] and payload["completion_tokens"] > 0
    wait_for(lambda: idle(scheduler), "the timed-out sequence to leave the batch")


def test_request_timeout_ends_a_stream_with_finish_reason_timeout(impatient_server):
    scheduler = impatient_server.scheduler
    with open_stream(impatient_server) as lines:
        events = [line[len("data: ") :] for line in lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "timeout"
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks)
    wait_for(lambda: idle(scheduler), "the timed-out sequence to leave the batch")


def test_model_that_cannot_batch_is_served_one_sequence_at_a_time(tiny_model):
    one_at_a_time = Faults(step_fault=False, batchable=False)  # a KV cache that cannot be merged
    prompts = ["Once upon a time", "The quick brown fox", "Servers load models"]
    with (
        serving(tiny_model, max_tokens_cap=ENDLESS, backend=one_at_a_time.backend) as live,
        httpx.Client(base_url=live.url, timeout=60) as http,
    ):
        steps_before = live.scheduler.steps
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            responses = list(
                pool.map(
                    lambda p: http.post("/v1/completions", json={"prompt": p, "max_tokens": 8, "temperature": 0}),
                    prompts,
                )
            )
        assert [r.status_code for r in responses] == [200] * 3
        assert [r.json()["usage"]["completion_tokens"] for r in responses] == [8] * 3
        assert live.scheduler.steps - steps_before == 3 * 8  # one token per step: no batching, no failure
        unbatched = [r.json()["choices"][0]["text"] for r in responses]
    with serving(tiny_model, max_tokens_cap=ENDLESS) as live, httpx.Client(base_url=live.url, timeout=60) as http:
        batched = [
            http.post("/v1/completions", json={"prompt": p, "max_tokens": 8, "temperature": 0}).json()["choices"][0][
                "text"
            ]
            for p in prompts
        ]
    assert unbatched == batched
