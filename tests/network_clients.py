"""HTTP clients that connect from a chosen loopback address, and the access-log line a request left.

Linux routes all of 127.0.0.0/8 to the loopback device, so one machine can play several
hosts: 127.0.0.1 a reverse proxy, 127.0.0.2 and up clients on the internet.
"""

from __future__ import annotations

import json
import socket
import ssl
import time

import httpx
import pytest


def _loopback_aliases() -> bool:
    try:
        with socket.socket() as probe:
            probe.bind(("127.0.0.2", 0))
        return True
    except OSError:
        return False


LOOPBACK_ALIASES = _loopback_aliases()
NO_LOOPBACK_ALIASES = (
    "connecting from 127.0.0.2 and up needs those loopback addresses "
    "(Linux has them; macOS: sudo ifconfig lo0 alias 127.0.0.N up, N = 2..7)"
)
needs_loopback_aliases = pytest.mark.skipif(not LOOPBACK_ALIASES, reason=NO_LOOPBACK_ALIASES)


def client_from(source: str, base_url: str, certificate=None) -> httpx.Client:
    """A client whose connections come from source; HTTPS verified against certificate when given."""
    verify = ssl.create_default_context(cafile=str(certificate)) if certificate else True
    transport = httpx.HTTPTransport(local_address=source, verify=verify)
    return httpx.Client(base_url=base_url, timeout=30, transport=transport)


def access_log_entry(log_path, request_id: str, timeout: float = 10.0) -> dict:
    """The JSON access-log line of a request; the server writes it just after the response, so wait for it."""
    deadline = time.monotonic() + timeout
    while True:
        text = log_path.read_text() if log_path.exists() else ""
        for line in text.splitlines():
            entry = json.loads(line)
            if entry["request_id"] == request_id:
                return entry
        if time.monotonic() > deadline:
            raise AssertionError(f"no access-log line for request {request_id} in {log_path}:\n{text}")
        time.sleep(0.05)
