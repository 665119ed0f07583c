"""Network settings: HTTPS, trusted proxies, a sub-path mount, CORS, and what a load may open."""

from __future__ import annotations

import uuid

import pytest
from click.testing import CliRunner
from network_clients import access_log_entry, client_from, needs_loopback_aliases

from forgellm.cli import build_cli
from forgellm.testing import ServerProcess, test_client, wait_until_loaded

PROXY_ADDRESS = "127.0.0.1"  # plays a trusted reverse proxy
CLIENT_ADDRESS = "127.0.0.2"  # plays a client on the internet


def client_seen(server_url: str, log_path, source: str, headers: dict, certificate=None) -> str:
    """The client address the server logs for a request sent from source with these headers."""
    request_id = uuid.uuid4().hex
    with client_from(source, server_url, certificate) as client:
        response = client.get("/healthz", headers={**headers, "X-Request-ID": request_id})
    assert response.status_code == 200
    return access_log_entry(log_path, request_id)["client"]


@pytest.fixture(scope="module")
def https_server(tls_certificate, tmp_path_factory):
    certificate, key = tls_certificate
    log_path = tmp_path_factory.mktemp("https") / "access.log"
    args = [
        "--ssl-certfile", str(certificate), "--ssl-keyfile", str(key),
        "--trusted-proxies", f"{PROXY_ADDRESS}/32",
        "--plugins", "logging", "--access-log-file", str(log_path),
    ]  # fmt: skip
    with ServerProcess(args, scheme="https", wait_ready=False) as server:
        yield server, log_path, certificate


@pytest.fixture(scope="module")
def default_server(tmp_path_factory):
    log_path = tmp_path_factory.mktemp("default") / "access.log"
    args = ["--plugins", "logging", "--access-log-file", str(log_path), "--root-path", "/llm/"]
    with ServerProcess(args, wait_ready=False) as server:
        yield server, log_path


def test_https_is_served_with_the_configured_certificate(https_server):
    server, _, certificate = https_server
    assert server.url.startswith("https://")
    with client_from(PROXY_ADDRESS, server.url, certificate) as client:
        assert client.get("/healthz").json() == {"status": "ok"}


def test_a_trusted_proxy_s_forwarded_address_is_believed(https_server):
    server, log_path, certificate = https_server
    forwarded = {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"}
    assert client_seen(server.url, log_path, PROXY_ADDRESS, forwarded, certificate) == "203.0.113.7"
    # A chain: the right-most address no trusted proxy vouches for is the client.
    chain = {"X-Forwarded-For": "198.51.100.1, 203.0.113.7, 127.0.0.1"}
    assert client_seen(server.url, log_path, PROXY_ADDRESS, chain, certificate) == "203.0.113.7"


@needs_loopback_aliases
def test_forwarded_headers_from_any_other_peer_are_ignored(https_server):
    server, log_path, certificate = https_server
    spoofed = {"X-Forwarded-For": "203.0.113.7"}
    assert client_seen(server.url, log_path, CLIENT_ADDRESS, spoofed, certificate) == CLIENT_ADDRESS


def test_without_trusted_proxies_no_peer_is_believed_not_even_localhost(default_server):
    server, log_path = default_server
    spoofed = {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"}
    assert client_seen(server.url, log_path, PROXY_ADDRESS, spoofed) == PROXY_ADDRESS


def test_a_sub_path_mount_serves_the_stripped_paths_and_logs_the_public_ones(default_server):
    """What a proxy sends for https://host/llm/api/model/status once it strips the /llm prefix."""
    server, log_path = default_server
    with client_from(PROXY_ADDRESS, server.url) as client:
        status = client.get("/api/model/status", headers={"X-Request-ID": "mounted-status"})
        missing = client.get("/v1/no-such-route")
    assert status.status_code == 200 and status.json()["loaded"] is False
    assert access_log_entry(log_path, "mounted-status")["path"] == "/llm/api/model/status"
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "not_found_error"  # OpenAI's shape: /v1 is found under the mount


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--trusted-proxies", "10.0.0.0/8,proxy.internal"], "'proxy.internal' is not an IP address or CIDR network"),
        (["--ssl-certfile", "/no/such/cert.pem"], "'/no/such/cert.pem' does not exist"),
        (["--ssl-keyfile", __file__], "--ssl-keyfile needs --ssl-certfile"),
    ],
)
def test_bad_network_settings_are_usage_errors(args, message):
    result = CliRunner().invoke(build_cli(), ["run", *args])
    assert result.exit_code == 2
    assert message in result.output


def test_trusted_proxies_are_normalized_and_read_back_from_a_printed_config(tmp_path):
    printed = CliRunner().invoke(build_cli(), ["run", "--trusted-proxies", "127.0.0.1, 10.0.0.0/8", "--print-config"])
    assert printed.exit_code == 0
    assert 'trusted_proxies = "127.0.0.1/32,10.0.0.0/8"' in printed.output
    config = tmp_path / "forgellm.toml"
    config.write_text(printed.output)
    again = CliRunner().invoke(build_cli(), ["run", "--config", str(config), "--print-config"])
    assert again.exit_code == 0, again.output
    assert again.output == printed.output


ORIGIN = "https://app.example.com"
PREFLIGHT = {
    "Origin": ORIGIN,
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization,content-type",
}


def test_cors_is_off_by_default():
    with test_client() as client:
        assert "access-control-allow-origin" not in client.get("/healthz", headers={"Origin": ORIGIN}).headers
        preflight = client.options("/api/model/generate", headers=PREFLIGHT)
        assert "access-control-allow-origin" not in preflight.headers


def test_cors_answers_the_configured_origins_only():
    with test_client(plugins="auth", api_key=("k" * 32,), cors_origin=(ORIGIN,)) as client:
        # Browsers send the preflight without credentials: it must pass even with auth on.
        preflight = client.options("/api/model/generate", headers=PREFLIGHT)
        assert preflight.status_code in (200, 204)
        assert preflight.headers["access-control-allow-origin"] == ORIGIN
        assert "authorization" in preflight.headers["access-control-allow-headers"].lower()

        allowed = client.get("/api/model/status", headers={"Origin": ORIGIN, "Authorization": "Bearer " + "k" * 32})
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == ORIGIN
        assert "x-request-id" in allowed.headers["access-control-expose-headers"].lower()

        other = {**PREFLIGHT, "Origin": "https://evil.example.com"}
        assert "access-control-allow-origin" not in client.options("/api/model/generate", headers=other).headers
        lookalike = {"Origin": ORIGIN + ".evil.example"}
        assert "access-control-allow-origin" not in client.get("/healthz", headers=lookalike).headers


def load(client, model_name: str, adapter_path=None):
    body = {"model_name": model_name}
    if adapter_path is not None:
        body["adapter_path"] = adapter_path
    return client.post("/api/model/load", json=body)


def test_allow_model_limits_what_a_load_may_open(tiny_model, tiny_adapter):
    models_dir = tiny_model.parent
    with test_client(allow_model=(f"{models_dir}/*", "mlx-community/*")) as client:
        for outside in ("/etc", f"{models_dir}/../../etc", f"{models_dir}/../{models_dir.name}x/x", "other/model"):
            refused = load(client, outside)
            assert refused.status_code == 403, outside
            assert refused.json() == {"success": False, "error": f"Loading {outside} is not allowed on this server"}
        # A refusal says nothing about what exists: a missing directory outside is a 403 too, inside a 400.
        assert load(client, "/no/such/model").status_code == 403
        assert load(client, f"{models_dir}/no-such-model").status_code == 400
        # The adapter must match as well.
        assert load(client, str(tiny_model), str(tiny_adapter)).status_code == 403

        assert load(client, str(tiny_model)).status_code == 200
        assert wait_until_loaded(client)["loaded"] is True
