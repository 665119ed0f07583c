"""The ``metrics`` plugin: Prometheus metrics at ``GET /metrics``.

Enable it with ``forgellm run --plugins metrics``. It exposes:

- ``forgellm_requests_total{route,method,status}``: every HTTP request, 404s included;
- ``forgellm_request_duration_seconds{route}``: time to the last byte (a stream's whole length);
- ``forgellm_time_to_first_token_seconds{route}``: from queueing a generation to its first token;
- ``forgellm_prompt_tokens_total{route}`` and ``forgellm_generated_tokens_total{route}``: finished generations;
- ``forgellm_refusals_total{reason}``: 401 (unauthenticated), 403 (forbidden), 429 (rate_limited) and
  503 (unavailable) answers, health probes excepted (their 503 means "not ready", not a refusal);
- ``forgellm_queue_depth`` and ``forgellm_active_sequences``: the scheduler, read at scrape time;
- ``forgellm_model_state{forgellm_model_state}`` and ``forgellm_model_load_seconds``: the default model;
- per resident model, labelled ``model`` (the name requests use): ``forgellm_model_generations_total``,
  ``forgellm_model_prompt_tokens_total``, ``forgellm_model_generated_tokens_total``,
  ``forgellm_model_queue_depth``, ``forgellm_model_active_sequences``, ``forgellm_model_memory_bytes``,
  ``forgellm_model_loaded_seconds`` (its load time) and ``forgellm_model_evictions_total``; with
  ``forgellm_memory_in_use_bytes`` and ``forgellm_memory_budget_bytes`` (--memory-budget) for all of them;
- ``vllm:num_requests_waiting`` and ``vllm:gpu_cache_usage_perc``: what the Kubernetes Gateway API Inference
  Extension routes on, under vLLM's names.

Route labels are the route's path template, never the raw path, and every unmatched path
shares the label ``unmatched``, so a scanner probing random URLs cannot grow the series.
Each server keeps its metrics in a registry of its own, so several apps in one process
(tests, embedding) never collide.

``/metrics`` needs the ``admin`` action: with an auth plugin on, scrape it with an admin
credential (Prometheus' ``authorization`` scrape setting); without one it is open.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from litestar import Request, Response, get
from litestar.enums import MediaType
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, StateSetMetricFamily
from prometheus_client.exposition import choose_encoder

from forgellm import ADMIN, PROBE_PATHS, Caller, RequestRecord, Server, Usage, guide_errors, hookimpl

PLUGIN = "metrics"
UNMATCHED_ROUTE = "unmatched"
REFUSAL_REASONS = {401: "unauthenticated", 403: "forbidden", 429: "rate_limited", 503: "unavailable"}
# Clients choose the method; anything unusual shares one label to keep the series bounded.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Generations run from milliseconds to the request timeout (600 s by default).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class ServerStateCollector:
    """Scheduler and model gauges, read from the server at every scrape so they are never stale."""

    def __init__(self, server: Server) -> None:
        self._server = server

    def collect(self) -> Iterator[Metric]:
        scheduler = self._server.default_model.scheduler
        yield GaugeMetricFamily(
            "forgellm_queue_depth", "Generations waiting for a batch slot.", value=scheduler.waiting_count
        )
        yield GaugeMetricFamily(
            "forgellm_active_sequences", "Generations being decoded in the batch.", value=scheduler.active_count
        )
        state = self._server.default_model.slot.state
        failed = state.error is not None
        yield StateSetMetricFamily(
            "forgellm_model_state",
            "The model manager's state.",
            value={
                "loaded": state.loaded,
                "loading": state.is_loading,
                "failed": failed,
                "unloaded": not (state.loaded or state.is_loading or failed),
            },
        )
        if state.load_seconds is not None:
            yield GaugeMetricFamily(
                "forgellm_model_load_seconds", "How long the serving model took to load.", value=state.load_seconds
            )
        yield from self._per_model()

    def _per_model(self) -> Iterator[Metric]:
        registry = self._server.registry
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
            "queue_depth": GaugeMetricFamily(
                "forgellm_model_queue_depth", "Generations waiting for a batch slot, by model.", labels=["model"]
            ),
            "active": GaugeMetricFamily(
                "forgellm_model_active_sequences", "Generations in the batch, by model.", labels=["model"]
            ),
            "memory": GaugeMetricFamily(
                "forgellm_model_memory_bytes", "Weights and KV caches held, by model.", labels=["model"]
            ),
            "loaded": GaugeMetricFamily(
                "forgellm_model_loaded_seconds", "How long each resident model took to load.", labels=["model"]
            ),
            "kv_per_token": GaugeMetricFamily(
                "forgellm_model_kv_bytes_per_token", "KV cache bytes of one position of one sequence.", labels=["model"]
            ),
            "kv_in_use": GaugeMetricFamily(
                "forgellm_model_kv_in_use_bytes", "The running batch's KV cache, by model.", labels=["model"]
            ),
            "kv_reserved": GaugeMetricFamily(
                "forgellm_model_kv_reserved_bytes",
                "What the running sequences' KV caches may grow to (admission's count), by model.",
                labels=["model"],
            ),
            "cache_bytes": GaugeMetricFamily(
                "forgellm_model_prompt_cache_bytes",
                "The prompt cache's size, by model and tier.",
                labels=["model", "tier"],
            ),
            "cache_entries": GaugeMetricFamily(
                "forgellm_model_prompt_cache_entries",
                "Sequences in the prompt cache, by model and tier.",
                labels=["model", "tier"],
            ),
            "lookups": CounterMetricFamily(
                "forgellm_model_prompt_cache_lookups", "Prompts looked up in the prompt cache.", labels=["model"]
            ),
            "hits": CounterMetricFamily(
                "forgellm_model_prompt_cache_hits",
                "Prompts that took a cached prefix, by the tier it came from (hit rate: hits / lookups).",
                labels=["model", "tier"],
            ),
        }
        for resident in registry.residents:
            if resident.model is None:
                continue
            families["queue_depth"].add_metric([resident.name], resident.scheduler.waiting_count)
            families["active"].add_metric([resident.name], resident.scheduler.active_count)
            families["memory"].add_metric([resident.name], resident.memory_bytes)
            if resident.slot.state.load_seconds is not None:
                families["loaded"].add_metric([resident.name], resident.slot.state.load_seconds)
            stats = resident.scheduler.cache_stats
            families["kv_per_token"].add_metric([resident.name], stats.kv_bytes_per_token)
            families["kv_in_use"].add_metric([resident.name], stats.kv_in_use)
            families["kv_reserved"].add_metric([resident.name], resident.scheduler.kv_reserved)
            families["lookups"].add_metric([resident.name], stats.lookups)
            for tier, nbytes, entries, hits in (
                ("memory", stats.memory_bytes, stats.memory_entries, stats.memory_hits),
                ("disk", stats.disk_bytes, stats.disk_entries, stats.disk_hits),
            ):
                families["cache_bytes"].add_metric([resident.name, tier], nbytes)
                families["cache_entries"].add_metric([resident.name, tier], entries)
                families["hits"].add_metric([resident.name, tier], hits)
        yield from families.values()
        evictions = CounterMetricFamily(
            "forgellm_model_evictions", "Models unloaded to make room for another, by model.", labels=["model"]
        )
        for name, count in registry.evictions.items():
            evictions.add_metric([name], count)
        yield evictions
        yield GaugeMetricFamily(
            "forgellm_memory_in_use_bytes",
            "Weights and KV caches of every resident model.",
            value=registry.memory_in_use(),
        )
        if registry.memory_budget is not None:
            yield GaugeMetricFamily(
                "forgellm_memory_budget_bytes", "The memory the resident models may take.", value=registry.memory_budget
            )


class InferenceGatewayCollector:
    """The gauges the Kubernetes Gateway API Inference Extension's endpoint picker routes on, under the names it
    scrapes from vLLM: ``vllm:num_requests_waiting`` (requests queued for a batch slot, over every resident
    model) and ``vllm:gpu_cache_usage_perc`` (how full the fullest model's KV cache is, 0 to 1: its running
    sequences' KV reservation over what --memory-budget leaves it, or without a budget its share of
    --max-concurrency's batch slots)."""

    def __init__(self, server: Server) -> None:
        self._server = server

    def collect(self) -> Iterator[Metric]:
        residents = self._server.registry.residents
        yield GaugeMetricFamily(
            "vllm:num_requests_waiting",
            "Requests waiting for a batch slot (the Gateway API Inference Extension's queue signal).",
            value=sum(resident.scheduler.waiting_count for resident in residents),
        )
        yield GaugeMetricFamily(
            "vllm:gpu_cache_usage_perc",
            "How full the fullest model's KV cache is, 0 to 1 (the Gateway API Inference Extension's KV signal).",
            value=max(map(self._kv_usage, residents), default=0.0),
        )

    def _kv_usage(self, resident: Any) -> float:
        scheduler = resident.scheduler
        allowance = scheduler.kv_admission.allowance()
        if allowance is not None:
            return min(1.0, scheduler.kv_reserved / allowance) if allowance > 0 else 1.0
        return float(min(1.0, scheduler.active_count / scheduler.max_concurrency))


class ServerMetrics:
    """One server's metrics, in a registry of its own."""

    def __init__(self, server: Server) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "forgellm_requests",
            "HTTP requests by route template, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "forgellm_request_duration_seconds",
            "Time from a request's arrival to its last response byte.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            "forgellm_time_to_first_token_seconds",
            "Time from queueing a generation to its first generated token.",
            ["route"],
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "forgellm_prompt_tokens", "Prompt tokens of finished generations.", ["route"], registry=self.registry
        )
        self.generated_tokens = Counter(
            "forgellm_generated_tokens", "Tokens generated by finished generations.", ["route"], registry=self.registry
        )
        self.model_generations = Counter(
            "forgellm_model_generations", "Finished generations, by model.", ["model"], registry=self.registry
        )
        self.model_prompt_tokens = Counter(
            "forgellm_model_prompt_tokens", "Prompt tokens of finished generations, by model.", ["model"],
            registry=self.registry,
        )  # fmt: skip
        self.model_generated_tokens = Counter(
            "forgellm_model_generated_tokens", "Tokens generated, by model.", ["model"], registry=self.registry
        )
        self.draft_tokens = Counter(
            "forgellm_model_draft_tokens", "Tokens speculative decoding drafted, by model and draft source.",
            ["model", "source"], registry=self.registry,
        )  # fmt: skip
        self.accepted_draft_tokens = Counter(
            "forgellm_model_accepted_draft_tokens",
            "Drafted tokens the model accepted (each saved a decoding step), by model and draft source.",
            ["model", "source"], registry=self.registry,
        )  # fmt: skip
        self.refusals = Counter("forgellm_refusals", "Requests refused, by reason.", ["reason"], registry=self.registry)
        for reason in REFUSAL_REASONS.values():
            self.refusals.labels(reason)  # present at zero from the first scrape, so rate() works at once
        self.registry.register(ServerStateCollector(server))
        self.registry.register(InferenceGatewayCollector(server))

    def observe_request(self, record: RequestRecord) -> None:
        route = record.route or UNMATCHED_ROUTE
        method = record.method if record.method in KNOWN_METHODS else "other"
        self.requests.labels(route, method, str(record.status)).inc()
        if record.latency_ms is not None:
            self.latency.labels(route).observe(record.latency_ms / 1000)
        reason = REFUSAL_REASONS.get(record.status) if record.status is not None else None
        if reason is not None and route not in PROBE_PATHS:
            self.refusals.labels(reason).inc()

    def observe_generation(
        self, route: str, model: str | None, usage: Usage, time_to_first_token_ms: float | None
    ) -> None:
        if model is not None:
            self.model_generations.labels(model).inc()
            self.model_prompt_tokens.labels(model).inc(usage.prompt_tokens)
            self.model_generated_tokens.labels(model).inc(usage.completion_tokens)
            for drafts in usage.drafts:
                self.draft_tokens.labels(model, drafts.source).inc(drafts.drafted)
                self.accepted_draft_tokens.labels(model, drafts.source).inc(drafts.accepted)
        self.prompt_tokens.labels(route).inc(usage.prompt_tokens)
        self.generated_tokens.labels(route).inc(usage.completion_tokens)
        if time_to_first_token_ms is not None:
            self.time_to_first_token.labels(route).observe(time_to_first_token_ms / 1000)


def metrics_of(server: Server) -> ServerMetrics:
    return server.plugin_state[PLUGIN]


@get(
    "/metrics",
    opt={"action": ADMIN},
    media_type=MediaType.TEXT,
    summary="Prometheus metrics",
    description=(
        "Prometheus text exposition format, or OpenMetrics when the Accept header asks for it. "
        "Needs the admin action when an auth plugin is on."
    ),
    tags=["operations"],
    responses=guide_errors(401, 403),
)
async def metrics(request: Request) -> Response[bytes]:
    encode, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(encode(metrics_of(request.app.state.server).registry), media_type=content_type)


@hookimpl
def register_routes(register: Callable[[Any], None], server: Server) -> None:
    server.plugin_state[PLUGIN] = ServerMetrics(server)
    register(metrics)


@hookimpl
def after_generate(request: Any, usage: Usage, caller: Caller, server: Server) -> None:
    record = caller.record
    route = request.scope.get("path_template") or UNMATCHED_ROUTE
    metrics_of(server).observe_generation(route, record.model, usage, record.time_to_first_token_ms)


@hookimpl
def access_log(entry: RequestRecord, server: Server) -> None:
    metrics_of(server).observe_request(entry)
