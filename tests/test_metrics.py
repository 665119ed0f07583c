"""The metrics plugin, scraped over HTTP as Prometheus would and parsed with prometheus-client's parser."""

from __future__ import annotations

import time

import httpx
import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from forgellm import ApiError, Unauthorized, hookimpl
from forgellm.cli import build_cli
from forgellm.testing import ServerProcess, test_client


def scrape(client) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics, keyed by (sample name, sorted labels)."""
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


class Gatekeeper:
    """A test plugin that refuses on request: the X-Refuse header names the status."""

    @hookimpl
    def authenticate(self, request):
        if request.headers.get("x-refuse") == "401":
            raise Unauthorized()
        return None

    @hookimpl
    def authorize(self, request):
        return False if request.headers.get("x-refuse") == "403" else None

    @hookimpl
    def before_generate(self, request):
        if request.headers.get("x-refuse") == "429":
            raise ApiError(429, "Slow down", headers={"Retry-After": "1"})


@pytest.fixture(scope="module")
def metered(tiny_model):
    with test_client(tiny_model, plugins="metrics", extra_plugins={"gatekeeper": Gatekeeper()}) as client:
        yield client


GENERATE = "/api/model/generate"


def test_requests_are_counted_by_route_template_method_and_status(metered):
    before = scrape(metered)
    assert metered.get("/api/model/status").status_code == 200
    assert metered.post(GENERATE, json={"prompt": 5}).status_code == 400
    after = scrape(metered)
    status = dict(route="/api/model/status", method="GET", status="200")
    invalid = dict(route=GENERATE, method="POST", status="400")
    assert value(after, "forgellm_requests_total", **status) == value(before, "forgellm_requests_total", **status) + 1
    assert value(after, "forgellm_requests_total", **invalid) == value(before, "forgellm_requests_total", **invalid) + 1
    duration = dict(route="/api/model/status")
    assert value(after, "forgellm_request_duration_seconds_count", **duration) == (
        value(before, "forgellm_request_duration_seconds_count", **duration) + 1
    )


def test_unknown_paths_share_one_label(metered):
    before = scrape(metered)
    for path in ("/wp-admin", "/.env", "/api/model/nonsense"):
        assert metered.get(path).status_code == 404
    after = scrape(metered)
    unmatched = dict(route="unmatched", method="GET", status="404")
    assert (
        value(after, "forgellm_requests_total", **unmatched)
        == value(before, "forgellm_requests_total", **unmatched) + 3
    )
    assert not any("/wp-admin" in str(labels) for _, labels in after)


def test_generations_count_tokens_and_time_to_first_token(metered):
    before = scrape(metered)
    body = metered.post(GENERATE, json={"prompt": "Once upon a time", "max_tokens": 5}).json()
    streamed = metered.post(GENERATE, json={"prompt": "Hello", "max_tokens": 3, "streaming": True})
    chat = metered.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
    assert streamed.status_code == chat.status_code == 200
    streamed_usage = [line for line in streamed.iter_lines() if '"complete"' in line]
    assert streamed_usage, streamed.text
    after = scrape(metered)

    def grew(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    guide = dict(route=GENERATE)
    openai = dict(route="/v1/chat/completions")
    assert grew("forgellm_generated_tokens_total", **guide) == 5 + 3
    assert grew("forgellm_generated_tokens_total", **openai) == 4
    assert grew("forgellm_prompt_tokens_total", **guide) >= body["prompt_tokens"] + 1
    assert grew("forgellm_prompt_tokens_total", **openai) == chat.json()["usage"]["prompt_tokens"]
    assert grew("forgellm_time_to_first_token_seconds_count", **guide) == 2
    assert grew("forgellm_time_to_first_token_seconds_count", **openai) == 1
    assert grew("forgellm_time_to_first_token_seconds_sum", **guide) > 0


@pytest.mark.parametrize(
    ("status", "reason", "path"),
    [
        ("401", "unauthenticated", "/api/model/status"),
        ("403", "forbidden", "/v1/models"),
        ("429", "rate_limited", GENERATE),
    ],
)
def test_refusals_are_counted_by_reason(metered, status, reason, path):
    before = scrape(metered)
    method = metered.post if path == GENERATE else metered.get
    kwargs = {"json": {"prompt": "hi", "max_tokens": 1}} if path == GENERATE else {}
    assert method(path, headers={"X-Refuse": status}, **kwargs).status_code == int(status)
    after = scrape(metered)
    assert (
        value(after, "forgellm_refusals_total", reason=reason)
        == value(before, "forgellm_refusals_total", reason=reason) + 1
    )


def test_every_refusal_reason_is_exported_from_the_start(tiny_model):
    with test_client(plugins="metrics") as fresh:
        samples = scrape(fresh)
    for reason in ("unauthenticated", "forbidden", "rate_limited", "unavailable"):
        assert ("forgellm_refusals_total", (("reason", reason),)) in samples


def test_model_state_and_load_time(metered):
    samples = scrape(metered)
    assert value(samples, "forgellm_model_state", forgellm_model_state="loaded") == 1
    assert value(samples, "forgellm_model_state", forgellm_model_state="unloaded") == 0
    assert value(samples, "forgellm_model_load_seconds") > 0
    assert value(samples, "forgellm_queue_depth") == 0
    assert value(samples, "forgellm_active_sequences") == 0


def test_a_server_without_a_model_reports_unloaded_and_not_ready():
    with test_client(plugins="metrics") as empty:
        assert empty.get("/readyz").status_code == 503
        samples = scrape(empty)
    assert value(samples, "forgellm_model_state", forgellm_model_state="unloaded") == 1
    assert ("forgellm_model_load_seconds", ()) not in samples
    # A probe's 503 means "not ready", which is not a refusal.
    assert value(samples, "forgellm_refusals_total", reason="unavailable") == 0


def test_each_server_has_its_own_registry(tiny_model):
    with test_client(plugins="metrics") as first, test_client(plugins="metrics") as second:
        first.get("/api/model/status")
        first.get("/api/model/status")
        second.get("/api/model/status")
        status = dict(route="/api/model/status", method="GET", status="200")
        assert value(scrape(first), "forgellm_requests_total", **status) == 2
        assert value(scrape(second), "forgellm_requests_total", **status) == 1


def test_openmetrics_when_the_scraper_asks_for_it(metered):
    response = metered.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.endswith("# EOF\n")


def test_metrics_need_the_admin_scope_when_auth_is_on(tiny_model, tmp_path):
    keys_file = str(tmp_path / "keys.json")
    cli = build_cli()

    def new_key(name: str, scopes: str) -> str:
        result = CliRunner().invoke(cli, ["keys", "add", name, "--scopes", scopes, "--api-keys-file", keys_file])
        assert result.exit_code == 0, result.output
        return result.stdout.strip()

    admin, user = new_key("prometheus", "admin"), new_key("app", "generate")
    with test_client(tiny_model, plugins="auth,metrics", api_keys_file=keys_file) as locked:
        assert locked.get("/metrics").status_code == 401
        assert locked.get("/metrics", headers={"Authorization": f"Bearer {user}"}).status_code == 403
        scraped = locked.get("/metrics", headers={"Authorization": f"Bearer {admin}"})
        assert scraped.status_code == 200
        samples = {s.name for f in text_string_to_metric_families(scraped.text) for s in f.samples}
        assert "forgellm_requests_total" in samples


def test_metrics_are_off_unless_enabled(client):
    assert client.get("/metrics").status_code == 404


def _poll(url: str, ready, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        with httpx.Client(base_url=url) as http:
            samples = scrape(http)
        if ready(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


def test_queue_depth_active_sequences_kv_usage_and_capacity_refusals_on_a_live_server(tiny_model):
    """One sequence decoding, one queued behind it, a third refused with 503; seen from /metrics."""
    args = [
        "--model",
        str(tiny_model),
        "--plugins",
        "metrics",
        "--max-concurrency",
        "1",
        "--max-queue",
        "1",
        "--max-tokens-cap",
        "1000000",
    ]
    endless = {"prompt": "Tell me a story", "max_tokens": 1000000, "streaming": True}
    with ServerProcess(args) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        with http.stream("POST", GENERATE, json=endless) as decoding:
            decoded = decoding.iter_lines()  # kept: a dropped iterator closes the connection
            next(decoded)  # its first chunk: it holds the only batch slot
            with http.stream("POST", GENERATE, json=endless) as queued:
                assert queued.status_code == 200
                samples = _poll(server.url, lambda s: value(s, "forgellm_queue_depth") == 1)
                assert value(samples, "forgellm_queue_depth") == 1
                assert value(samples, "forgellm_active_sequences") == 1
                # What the Gateway API Inference Extension routes on, under vLLM's names: the one batch slot is
                # taken (no --memory-budget: the share of slots), one request waits.
                assert value(samples, "vllm:num_requests_waiting") == 1
                assert value(samples, "vllm:gpu_cache_usage_perc") == 1.0
                refused = http.post(GENERATE, json={"prompt": "hi"})
                assert refused.status_code == 503
                assert refused.headers["retry-after"]
        # Leaving the streams cancels both sequences.
        samples = _poll(server.url, lambda s: value(s, "forgellm_active_sequences") == 0)
        assert value(samples, "forgellm_active_sequences") == 0
        assert value(samples, "forgellm_queue_depth") == 0
        assert value(samples, "vllm:num_requests_waiting") == 0
        assert value(samples, "vllm:gpu_cache_usage_perc") == 0.0
        assert value(samples, "forgellm_refusals_total", reason="unavailable") == 1
