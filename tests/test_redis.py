"""Two server processes sharing one rate-limit budget through a real Redis server."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import pytest
import redis
from network_clients import client_from, needs_loopback_aliases

from forgellm.testing import ServerProcess, free_port

REDIS_SERVER = shutil.which("redis-server", path=os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/usr/bin")
pytestmark = [
    pytest.mark.redis,
    needs_loopback_aliases,
    pytest.mark.skipif(
        REDIS_SERVER is None, reason="redis-server is not installed (Debian: apt-get install redis-server)"
    ),
]

RATE_LIMIT = 3
TOKEN_LIMIT = 30


class RedisServer:
    """A throwaway redis-server on a free port, nothing persisted."""

    def __init__(self, directory) -> None:
        self.port = free_port()
        self.directory = directory
        self.process = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    if server.process.poll() is None:
        server.stop()


@pytest.fixture(scope="module")
def replicas(tiny_model, redis_server):
    args = [
        "--model", str(tiny_model),
        "--plugins", "ratelimit",
        "--rate-limit", f"{RATE_LIMIT}/minute",
        "--token-limit", f"{TOKEN_LIMIT}/minute",
        "--rate-limit-storage", redis_server.url,
    ]  # fmt: skip
    with ExitStack() as stack:
        processes = [ServerProcess(args), ServerProcess(args)]
        with ThreadPoolExecutor(2) as pool:  # start both at once
            for started in pool.map(lambda process: process.__enter__(), processes):
                stack.callback(started.__exit__, None, None, None)
        yield processes


def generate(server, source: str, max_tokens: int = 2):
    with client_from(source, server.url) as client:
        return client.post("/api/model/generate", json={"prompt": "hello", "max_tokens": max_tokens})


def test_the_request_budget_is_shared_across_replicas(replicas):
    first, second = replicas
    assert [generate(server, "127.0.0.2").status_code for server in (first, second, first)] == [200] * RATE_LIMIT
    refused = generate(second, "127.0.0.2")
    assert refused.status_code == 429
    assert refused.headers["RateLimit-Limit"] == str(RATE_LIMIT)
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    # Another client's budget is its own, on either replica.
    assert generate(second, "127.0.0.3").status_code == 200


def test_the_token_budget_is_shared_across_replicas(replicas):
    first, second = replicas
    assert generate(first, "127.0.0.4", max_tokens=20).status_code == 200
    assert generate(second, "127.0.0.4", max_tokens=20).status_code == 200  # 10 tokens were left
    refused = generate(first, "127.0.0.4")
    assert refused.status_code == 429
    assert "Token budget spent" in refused.json()["error"]


def test_without_redis_a_generation_is_refused_with_a_503_and_served_again_once_it_is_back(replicas, redis_server):
    first, _ = replicas
    redis_server.stop()
    try:
        refused = generate(first, "127.0.0.5")
        assert refused.status_code == 503
        assert refused.json() == {"success": False, "error": "Rate-limit storage is unavailable; retry shortly"}
        assert refused.headers["Retry-After"] == "5"
    finally:
        redis_server.start()
    assert generate(first, "127.0.0.5").status_code == 200  # redis-py reconnects by itself
