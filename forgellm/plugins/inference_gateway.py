"""The gauges the Kubernetes Gateway API Inference Extension's endpoint picker routes on, under the names it
scrapes from vLLM: ``vllm:num_requests_waiting`` (requests queued for a batch slot, over every resident model)
and ``vllm:gpu_cache_usage_perc`` (how full the fullest model's KV cache is, 0 to 1: its running sequences' KV
reservation over what --memory-budget leaves it, or without a budget its share of --max-concurrency's batch
slots). The metrics plugin exports them beside its own."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric

from forgellm import Server


class InferenceGatewayCollector:
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
