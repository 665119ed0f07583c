"""ForgeLLM behind a real nginx terminating TLS, configured by docs/nginx.conf.example as docs/security.md deploys it.

nginx and the server run on the loopback device: nginx reaches the server from 127.0.0.1 (the
trusted proxy), clients reach nginx from 127.0.0.2 and up, each a distinct client address.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from network_clients import LOOPBACK_ALIASES, NO_LOOPBACK_ALIASES, access_log_entry, client_from

from forgellm.testing import ServerProcess, free_port

NGINX = shutil.which("nginx", path=os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin")
pytestmark = pytest.mark.nginx

DOCS = Path(__file__).parent.parent / "docs"
SITE_CONFIG = DOCS / "nginx.conf.example"
REPLICAS_CONFIG = DOCS / "nginx-replicas.conf.example"
MOUNT = "/llm"
RATE_LIMIT = 3


def site_config(https_port: int, http_port: int, upstream_port: int, certificate, key) -> str:
    """The documented configuration, with this test's ports and certificate in place of the production ones."""
    text = SITE_CONFIG.read_text()
    replacements = {
        "listen 443 ssl;": f"listen 127.0.0.1:{https_port} ssl;",
        "listen 80;": f"listen 127.0.0.1:{http_port};",
        "/etc/ssl/certs/forgellm.crt": str(certificate),
        "/etc/ssl/private/forgellm.key": str(key),
        "server 127.0.0.1:5001;": f"server 127.0.0.1:{upstream_port};",
    }
    for production, test_value in replacements.items():
        assert text.count(production) == 1, f"docs/nginx.conf.example no longer has {production!r}"
        text = text.replace(production, test_value)
    return text


def main_config(directory: Path, site: Path) -> str:
    """nginx.conf around the site file: everything in the test's directory, no root needed."""
    temp_paths = "\n".join(
        f"    {kind}_temp_path {directory / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""
daemon off;
master_process off;
pid {directory / "nginx.pid"};
error_log {directory / "error.log"} info;
events {{ worker_connections 64; }}
http {{
    access_log {directory / "access.log"};
{temp_paths}
    include {site};
}}
"""


def wait_for_port(port: int, process: subprocess.Popen, log: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"nginx exited with {process.returncode}:\n{log.read_text()}")
        try:
            httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.05)
    raise TimeoutError(f"nginx did not listen on {port}:\n{log.read_text()}")


@pytest.fixture(scope="module")
def deployment(tiny_model, tls_certificate, tmp_path_factory):
    """The documented deployment: the server with the proxy settings, nginx in front of it."""
    if NGINX is None:
        pytest.skip("nginx is not installed (Debian: apt-get install nginx)")
    if not LOOPBACK_ALIASES:
        pytest.skip(NO_LOOPBACK_ALIASES)
    directory = tmp_path_factory.mktemp("nginx")
    access_log = directory / "forgellm-access.log"
    args = [
        "--model", str(tiny_model),
        "--plugins", "ratelimit,logging",
        "--rate-limit", f"{RATE_LIMIT}/minute",
        "--trusted-proxies", "127.0.0.1/32",
        "--root-path", MOUNT,
        "--access-log-file", str(access_log),
    ]  # fmt: skip
    with ServerProcess(args) as server:
        certificate, key = tls_certificate
        https_port, http_port = free_port(), free_port()
        site = site_config(https_port, http_port, server.port, certificate, key)
        with running_nginx(directory, site, http_port):
            yield {
                "server": server,
                "public_url": f"https://127.0.0.1:{https_port}{MOUNT}",
                "http_port": http_port,
                "certificate": certificate,
                "access_log": access_log,
            }


@contextlib.contextmanager
def running_nginx(directory: Path, site_text: str, http_port: int) -> Iterator[None]:
    site = directory / "forgellm.conf"
    site.write_text(site_text)
    config = directory / "nginx.conf"
    config.write_text(main_config(directory, site))
    output = directory / "nginx.out"
    with open(output, "w") as sink:
        nginx = subprocess.Popen(
            [NGINX, "-p", str(directory), "-c", str(config), "-e", str(directory / "error.log")],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_port(http_port, nginx, output)
        yield
    finally:
        nginx.send_signal(signal.SIGQUIT)  # graceful stop
        try:
            nginx.wait(timeout=10)
        except subprocess.TimeoutExpired:
            nginx.kill()
            nginx.wait()


def test_the_deployment_guide_shows_the_configuration_tested_here():
    assert f"```nginx\n{SITE_CONFIG.read_text()}```" in (DOCS / "security.md").read_text()


def through_nginx(deployment, source: str) -> httpx.Client:
    return client_from(source, deployment["public_url"], deployment["certificate"])


def generate(client, **headers):
    return client.post("/api/model/generate", json={"prompt": "hello", "max_tokens": 2}, headers=headers)


def test_the_api_answers_under_the_sub_path_over_verified_tls(deployment):
    with through_nginx(deployment, "127.0.0.2") as client:
        status = client.get("/api/model/status")
        assert status.status_code == 200
        assert status.json()["loaded"] is True
        assert client.get("/v1/models").json()["object"] == "list"
        missing = client.get("/v1/no-such-route")
        assert missing.status_code == 404
        assert missing.json()["error"]["type"] == "not_found_error"


def test_plain_http_is_redirected_to_https(deployment):
    response = httpx.get(f"http://127.0.0.1:{deployment['http_port']}{MOUNT}/api/model/status")
    assert response.status_code == 301
    assert response.headers["location"].startswith("https://")


def test_the_real_client_address_and_request_id_reach_the_log(deployment):
    with through_nginx(deployment, "127.0.0.2") as client:
        sent = client.get("/api/model/status", headers={"X-Request-ID": "through-nginx-1"})
        made = client.get("/api/model/status")
    assert sent.headers["X-Request-ID"] == "through-nginx-1"
    entry = access_log_entry(deployment["access_log"], "through-nginx-1")
    assert entry["client"] == "127.0.0.2"
    assert entry["path"] == f"{MOUNT}/api/model/status"
    assert entry["status"] == 200
    # Without one, nginx's own $request_id is used, so nginx's log and ForgeLLM's share it.
    assert re.fullmatch(r"[0-9a-f]{32}", made.headers["X-Request-ID"])
    assert access_log_entry(deployment["access_log"], made.headers["X-Request-ID"])["client"] == "127.0.0.2"


def test_the_rate_limiter_counts_each_client_behind_the_proxy_apart(deployment):
    with through_nginx(deployment, "127.0.0.3") as first, through_nginx(deployment, "127.0.0.4") as second:
        for _ in range(RATE_LIMIT):
            assert generate(first).status_code == 200
        refused = generate(first, **{"X-Request-ID": "first-refused"})
        assert refused.status_code == 429
        assert refused.json()["success"] is False
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        assert refused.headers["RateLimit-Limit"] == str(RATE_LIMIT)
        assert refused.headers["RateLimit-Remaining"] == "0"
        # Were the limiter counting nginx's address, this client would be refused too.
        assert generate(second).status_code == 200
    entry = access_log_entry(deployment["access_log"], "first-refused")
    assert (entry["client"], entry["status"]) == ("127.0.0.3", 429)


def test_a_forwarded_for_forged_through_the_proxy_neither_hides_the_client_nor_escapes_its_limit(deployment):
    with through_nginx(deployment, "127.0.0.5") as client:
        for number in range(RATE_LIMIT):
            assert generate(client, **{"X-Forwarded-For": f"10.0.0.{number}"}).status_code == 200
        forged = generate(client, **{"X-Forwarded-For": "10.0.0.99", "X-Request-ID": "forged-via-nginx"})
    assert forged.status_code == 429
    assert access_log_entry(deployment["access_log"], "forged-via-nginx")["client"] == "127.0.0.5"


def test_a_forwarded_for_sent_to_the_server_directly_by_an_untrusted_peer_is_ignored(deployment):
    server = deployment["server"]
    with client_from("127.0.0.6", server.url) as client:
        response = client.get(
            "/api/model/status", headers={"X-Forwarded-For": "10.9.9.9", "X-Request-ID": "direct-forged"}
        )
    assert response.status_code == 200
    assert access_log_entry(deployment["access_log"], "direct-forged")["client"] == "127.0.0.6"


def test_clients_forwarded_by_a_trusted_hop_are_told_apart(deployment):
    """A trusted hop in front of nginx (here 127.0.0.1 itself) names the client in X-Forwarded-For."""
    with through_nginx(deployment, "127.0.0.1") as hop:
        for _ in range(RATE_LIMIT):
            assert generate(hop, **{"X-Forwarded-For": "198.51.100.7"}).status_code == 200
        refused = generate(hop, **{"X-Forwarded-For": "198.51.100.7", "X-Request-ID": "hop-refused"})
        other = generate(hop, **{"X-Forwarded-For": "198.51.100.8", "X-Request-ID": "hop-other"})
    assert refused.status_code == 429
    assert other.status_code == 200
    assert access_log_entry(deployment["access_log"], "hop-refused")["client"] == "198.51.100.7"
    assert access_log_entry(deployment["access_log"], "hop-other")["client"] == "198.51.100.8"


def test_a_stream_passes_through_whole(deployment):
    body = {"prompt": "hello", "max_tokens": 5, "streaming": True}
    with through_nginx(deployment, "127.0.0.7") as client:
        with client.stream("POST", "/api/model/generate", json=body) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("application/x-ndjson")
            lines = [json.loads(line) for line in response.iter_lines() if line]
    assert [line["type"] for line in lines[:-1]] == ["chunk"] * (len(lines) - 1)
    assert lines[-1]["type"] == "complete"
    assert lines[-1]["completion_tokens"] == 5


def replicas_site_config(https_port: int, http_port: int, replica_ports: list[int], certificate, key) -> str:
    """The documented configuration with its upstream block replaced by the replicas' (affinity hashing)."""
    site = site_config(https_port, http_port, replica_ports[0], certificate, key)
    upstream = re.search(r"upstream forgellm \{.*?\n\}\n", site, re.DOTALL)
    assert upstream is not None
    replicas = REPLICAS_CONFIG.read_text()
    documented = re.findall(r"server \S+:5001;", replicas)
    assert len(documented) == len(replica_ports), "docs/nginx-replicas.conf.example lists another replica count"
    for line, port in zip(documented, replica_ports, strict=True):
        replicas = replicas.replace(line, f"server 127.0.0.1:{port};")
    return site.replace(upstream.group(0), replicas)


@pytest.fixture(scope="module")
def replicated_deployment(tiny_model, tls_certificate, tmp_path_factory):
    """Two replicas behind the documented nginx, each conversation routed to one of them by its session."""
    if NGINX is None:
        pytest.skip("nginx is not installed (Debian: apt-get install nginx)")
    directory = tmp_path_factory.mktemp("nginx-replicas")
    args = ["--model", str(tiny_model), "--trusted-proxies", "127.0.0.1/32", "--root-path", MOUNT]
    with ServerProcess(args) as first, ServerProcess(args) as second:
        certificate, key = tls_certificate
        https_port, http_port = free_port(), free_port()
        site = replicas_site_config(https_port, http_port, [first.port, second.port], certificate, key)
        with running_nginx(directory, site, http_port):
            yield {"replicas": (first, second), "public_url": f"https://127.0.0.1:{https_port}{MOUNT}",
                   "certificate": certificate}  # fmt: skip


def test_the_deployment_guide_shows_the_replicas_configuration_tested_here():
    assert f"```nginx\n{REPLICAS_CONFIG.read_text()}```" in (DOCS / "security.md").read_text()


def test_each_conversation_keeps_to_one_replica_whose_prompt_cache_holds_its_earlier_turns(replicated_deployment):
    sessions = [f"conversation-{number}" for number in range(8)]
    with client_from("127.0.0.1", replicated_deployment["public_url"], replicated_deployment["certificate"]) as client:
        for session in sessions:
            messages = [{"role": "user", "content": f"Tell me a story about {session}."}]
            headers = {"X-Session-ID": session}
            first = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 8}, headers=headers)
            assert first.status_code == 200
            messages += [first.json()["choices"][0]["message"], {"role": "user", "content": "And then?"}]
            second = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 8}, headers=headers)
            assert second.status_code == 200
            # Its earlier turn's KV cache is on the replica it reached: the same one.
            assert second.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0, session
    lookups = [
        httpx.get(f"{replica.url}/api/models").json()["models"][0]["kv_cache"]["lookups"]
        for replica in replicated_deployment["replicas"]
    ]
    assert sum(lookups) == 2 * len(sessions)
    assert all(lookups), f"the sessions all went to one replica: {lookups}"
