"""Graceful shutdown of a real `forgellm run` process: SIGTERM while streams and plain requests generate.

The port closes at once, so new clients are refused rather than half-served; the requests in
flight run to their last token, provided they finish within --drain-timeout; one that would not is
cut off at the timeout, so a shutdown never hangs; then the process exits 0.
"""

from __future__ import annotations

import json
import signal
import socket
import threading

import httpx
import pytest
from live_server import wait_for
from prometheus_client.parser import text_string_to_metric_families

from forgellm.testing import ServerProcess

DRAIN_TIMEOUT = 12  # seconds: ample for FINISHING tokens, while ENDLESS cannot finish in it
FINISHING = 300  # about two seconds of decoding on 2 CPU cores, batched five at a time
ENDLESS = 1_000_000  # minutes of tokens: a shutdown that waited for it would not end in the test's time

IN_FLIGHT = {
    "guide stream": ("/api/model/generate", {"prompt": "Once upon a time", "max_tokens": FINISHING, "streaming": True}),
    "OpenAI stream": ("/v1/completions", {"prompt": "The quick brown fox", "max_tokens": FINISHING, "stream": True}),
    "guide plain": ("/api/model/generate", {"prompt": "Servers load models", "max_tokens": FINISHING}),
    "OpenAI plain": (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": FINISHING},
    ),
    "endless stream": ("/v1/completions", {"prompt": "Language models predict", "max_tokens": ENDLESS, "stream": True}),
}


class Request(threading.Thread):
    """One request on its own connection, read to its end (or until the server cuts it)."""

    def __init__(self, url: str, path: str, body: dict) -> None:
        super().__init__(daemon=True)
        self.url, self.path, self.body = url, path, body
        self.status: int | None = None
        self.lines: list[str] = []
        self.error: Exception | None = None
        self.first_line = threading.Event()

    def run(self) -> None:
        try:
            with (
                httpx.Client(base_url=self.url, timeout=120) as http,
                http.stream("POST", self.path, json=self.body) as r,
            ):
                self.status = r.status_code
                for line in r.iter_lines():
                    if line:
                        self.lines.append(line)
                        self.first_line.set()
        except httpx.HTTPError as exc:
            self.error = exc
        finally:
            self.first_line.set()

    @property
    def streamed(self) -> bool:
        return self.body.get("stream") or self.body.get("streaming")


def active_sequences(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    (family,) = [f for f in text_string_to_metric_families(text) if f.name == "forgellm_active_sequences"]
    return family.samples[0].value


def accepts_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except (ConnectionRefusedError, ConnectionResetError):
        # A reset is the listener closing with our connection still in its backlog.
        return False


def assert_finished_whole(name: str, request: Request) -> None:
    assert request.error is None, f"{name}: {request.error!r}"
    assert request.status == 200, f"{name}: {request.status} {request.lines}"
    if request.path.startswith("/v1") and request.streamed:
        events = [line[len("data: ") :] for line in request.lines if line.startswith("data: ")]
        assert events[-1] == "[DONE]", f"{name}: {events[-3:]}"
        assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length", f"{name}: {events[-2]}"
    elif request.streamed:
        last = json.loads(request.lines[-1])
        assert last["type"] == "complete" and last["completion_tokens"] == FINISHING, f"{name}: {last}"
    else:
        body = json.loads("".join(request.lines))
        tokens = body["usage"]["completion_tokens"] if request.path.startswith("/v1") else body["completion_tokens"]
        assert tokens == FINISHING, f"{name}: {body}"


@pytest.fixture()
def server(tiny_model):
    args = [
        "--model",
        str(tiny_model),
        "--plugins",
        "metrics",
        "--drain-timeout",
        str(DRAIN_TIMEOUT),
        "--max-tokens-cap",
        str(ENDLESS),
    ]
    with ServerProcess(args) as process:
        yield process


def test_sigterm_closes_the_port_drains_in_flight_requests_and_exits_0(server):
    requests = {name: Request(server.url, path, body) for name, (path, body) in IN_FLIGHT.items()}
    for request in requests.values():
        request.start()
    wait_for(lambda: active_sequences(server.url) == len(requests), "every request to be generating", timeout=30)
    for name, request in requests.items():
        if request.streamed:
            assert request.first_line.wait(30), f"{name} never began"

    assert all(request.is_alive() for request in requests.values()), "make FINISHING longer: a request ended early"

    server.process.send_signal(signal.SIGTERM)

    wait_for(lambda: not accepts_connections(server.port), "the port to stop accepting connections", timeout=30)
    assert requests["endless stream"].is_alive(), "the port must close while requests are still in flight"
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/healthz", timeout=5)

    for request in requests.values():
        request.join(timeout=DRAIN_TIMEOUT + 30)
    for name, request in requests.items():
        if name != "endless stream":
            assert_finished_whole(name, request)
    endless = requests["endless stream"]
    assert endless.lines, "the endless stream sent nothing before the cut"
    assert "[DONE]" not in endless.lines[-1], "it cannot have finished: it was cut at the drain timeout"

    # The cut sequence left the engine too: the engine thread, which finishes admitted work, let the process end.
    server.process.wait(timeout=60)  # no second signal: that would force uvicorn to quit at once
    code, output = server.stop()
    cut = "Task cancelled, timeout graceful shutdown exceeded"
    assert "Cancel 1 running task(s), timeout graceful shutdown exceeded" in output, output
    # uvicorn logs the task it cancelled with its traceback; nothing else may fail.
    assert output.count("Traceback") == output.count(f"CancelledError: {cut}") == 1, output
    assert "Application shutdown complete" in output, output
    assert code == 0, output
