"""Connections that never finish their headers, huge headers and socket floods, against `forgellm run`.

Each attack here worked before the connection guard (forgellm/core/http/connection_guard.py): idle and
slow-header connections stayed open forever, a 300 MB header was parsed for two minutes, and
mlx-lm's import lowered the open-file limit to 2048 (and failed under a hard limit below 4096).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from forgellm.testing import ServerProcess, free_port

REQUEST_START = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"


def _connect(server: ServerProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def _read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def _closed_by_server(sock: socket.socket) -> bool:
    """Whether the server has closed this connection (a read returns end-of-file or a reset at once)."""
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True
    finally:
        sock.setblocking(True)


@pytest.fixture(scope="module")
def guarded():
    with ServerProcess(["--header-timeout", "1", "--max-header-size", "16384"], wait_ready=False) as server:
        yield server


def test_headers_sent_slowly_get_a_408_and_the_connection_closes(guarded):
    with _connect(guarded) as sock:
        sock.sendall(REQUEST_START)
        for _ in range(20):  # a slowloris: one header byte at a time, never the blank line
            try:
                sock.sendall(b"X")
            except OSError:
                break
            time.sleep(0.2)
        answer = _read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1]) == {
        "success": False,
        "error": "The request headers did not arrive in time",
    }


def test_a_connection_that_sends_nothing_is_closed_without_an_answer(guarded):
    with _connect(guarded) as sock:
        sock.settimeout(10)
        assert _read_until_closed(sock) == b""  # closed after the header timeout, with nothing written


def test_a_kept_alive_connection_gets_a_new_header_deadline_for_each_request(guarded):
    with _connect(guarded) as sock:
        sock.sendall(REQUEST_START + b"\r\n")
        first = b""
        while not first.endswith(b'{"status":"ok"}'):  # the whole first answer, however it is split
            first += sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200 ")
        time.sleep(0.5)
        sock.sendall(REQUEST_START)  # the second request never finishes its headers
        answer = _read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408 ")


def test_a_header_over_the_limit_is_a_431_and_never_parsed(guarded):
    with _connect(guarded) as sock:
        sock.sendall(REQUEST_START + b"X-Padding: ")
        try:
            for _ in range(300):  # 300 MB were accepted before; the server stops reading long before
                sock.sendall(b"a" * (1 << 20))
        except OSError:
            pass
        answer = _read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 431 ")
    assert b"Request headers are larger than 16384 bytes" in answer
    assert httpx.get(f"{guarded.url}/healthz").status_code == 200


def test_headers_just_under_the_limit_and_a_body_past_it_are_served(guarded, tmp_path):
    padding = "a" * 15000
    assert httpx.get(f"{guarded.url}/healthz", headers={"X-Padding": padding}).status_code == 200
    # The body does not count as header bytes, even when it arrives in the same packet as the headers.
    response = httpx.post(
        f"{guarded.url}/api/model/load",
        content=json.dumps({"model_name": "/x" * 20000}),
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 400


def test_idle_connections_past_the_cap_make_room_for_a_new_client():
    with ServerProcess(["--max-connections", "20", "--header-timeout", "60"], wait_ready=False) as server:
        with contextlib.ExitStack() as stack:
            idle = [stack.enter_context(_connect(server)) for _ in range(40)]
            time.sleep(0.5)
            answers = [httpx.get(f"{server.url}/healthz", timeout=10).status_code for _ in range(5)]
            assert answers == [200] * 5
            assert sum(_closed_by_server(sock) for sock in idle) >= 20  # the oldest idle ones made room


SLOW_BODY = (
    b"POST /api/model/generate HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
)


def test_a_body_that_does_not_arrive_in_time_is_a_408_and_the_connection_closes():
    with ServerProcess(["--body-timeout", "1"], wait_ready=False) as server, _connect(server) as sock:
        sock.sendall(SLOW_BODY)  # headers whole, then 1 byte of a 100-byte body
        started = time.monotonic()
        answer = _read_until_closed(sock)
        assert time.monotonic() - started < 10
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1]) == {
        "success": False,
        "error": "The request body did not arrive in time",
    }


def test_slow_bodies_cannot_hold_the_connection_cap():
    # Before: connections that sent headers and 1 byte of their body were never timed out; at the cap,
    # /healthz failed 20 of 20.
    args = ["--max-connections", "20", "--body-timeout", "1", "--header-timeout", "60"]
    with ServerProcess(args, wait_ready=False) as server, contextlib.ExitStack() as stack:
        slow = [stack.enter_context(_connect(server)) for _ in range(30)]
        for sock in slow:
            with contextlib.suppress(OSError):
                sock.sendall(SLOW_BODY)
        time.sleep(2)
        answers = [httpx.get(f"{server.url}/healthz", timeout=10).status_code for _ in range(20)]
        assert answers == [200] * 20
        for sock in slow:  # each closed: with a 408, or at once when it came past the cap
            sock.settimeout(5)
            try:
                answer = _read_until_closed(sock)
            except ConnectionResetError:
                continue
            assert answer == b"" or answer.startswith(b"HTTP/1.1 408 ")


def test_a_whole_body_in_time_is_served():
    with ServerProcess(["--body-timeout", "1"], wait_ready=False) as server:
        answer = httpx.post(f"{server.url}/api/model/generate", json={"prompt": "hi"})
        assert answer.status_code == 400  # read whole and answered: no model is loaded
        assert answer.json() == {"success": False, "error": "No model loaded"}


def _serve_under_open_file_limit(soft: int, hard: int):
    """`forgellm run` started under this RLIMIT_NOFILE; yields (its URL, its pid)."""
    port = free_port()
    code = (
        "import resource, sys; "
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard})); "
        "from forgellm.cli import main; "
        f"sys.argv = ['forgellm', 'run', '--host', '127.0.0.1', '--port', '{port}']; main()"
    )
    env = {**os.environ, "FORGELLM_NO_MODEL": "1", "HF_HUB_OFFLINE": "1"}
    return port, subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def test_the_server_starts_under_a_low_hard_open_file_limit_and_raises_its_soft_limit():
    port, process = _serve_under_open_file_limit(256, 3000)  # mlx-lm's import asked for a hard limit of 4096
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.stdout.read()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                    break
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        limits = open(f"/proc/{process.pid}/limits").read()
        line = next(row for row in limits.splitlines() if row.startswith("Max open files"))
        assert line.split()[3:5] == ["3000", "3000"]  # soft raised to the hard limit, the hard one kept
    finally:
        process.terminate()
        process.wait(timeout=30)
