"""Prometheus metrics: what the gateway counts on every request, and what it reads at scrape time.

Counters and histograms are updated in process on the hot path (a few microseconds). With several
uvicorn workers, `scripts/serve.py` points PROMETHEUS_MULTIPROC_DIR at a fresh folder before the
workers start, so each worker writes its values there and any worker's /metrics adds them all up
(prometheus-client's multiprocess mode). Values read at scrape time (open holds, the outbox depth,
breaker states) are gauges computed by the worker that answers.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE_LATEST", "render"]

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

HTTP_REQUESTS = Counter(
    "gatewayz_http_requests_total",
    "HTTP requests answered, by route template, method and status.",
    ["route", "method", "status"],
)
HTTP_LATENCY = Histogram(
    "gatewayz_http_request_duration_seconds",
    "Time from the request's arrival to the end of its response, by route template.",
    ["route"],
    buckets=LATENCY_BUCKETS,
)
UPSTREAM_LATENCY = Histogram(
    "gatewayz_upstream_duration_seconds",
    "Time to the provider's answer (first byte for streams), by provider and outcome.",
    ["provider", "outcome"],
    buckets=LATENCY_BUCKETS,
)
UPSTREAM_ERRORS = Counter(
    "gatewayz_upstream_errors_total",
    "Failed provider calls (connect errors, timeouts, 5xx, 429), by provider and kind.",
    ["provider", "kind"],
)
TOKENS = Counter("gatewayz_tokens_total", "Tokens billed, by direction (input or output).", ["direction"])
CREDITS_CHARGED = Counter("gatewayz_credits_charged_total", "Credits charged by settlements.")
SHORTFALLS = Counter(
    "gatewayz_billing_shortfalls_total", "Settlements whose real cost was above what could be charged."
)
SHORTFALL_CREDITS = Counter(
    "gatewayz_billing_shortfall_credits_total", "Credits of real cost that could not be charged."
)
RATE_LIMITED = Counter(
    "gatewayz_rate_limit_rejections_total",
    "Requests refused with 429 by the gateway's own limits, by subject (key or user) and limit.",
    ["subject", "limit"],
)


class _Snapshot(Collector):
    """Gauges read at scrape time, handed in by the /metrics route."""

    def __init__(self, values: dict[str, tuple[str, float | dict[str, float]]]) -> None:
        self.values = values

    def collect(self) -> Iterable[Metric]:
        for name, (help_text, value) in self.values.items():
            if isinstance(value, dict):
                family = GaugeMetricFamily(name, help_text, labels=["provider"])
                for label, number in value.items():
                    family.add_metric([label], number)
            else:
                family = GaugeMetricFamily(name, help_text, value=value)
            yield family


def render(snapshot: dict[str, tuple[str, float | dict[str, float]]]) -> bytes:
    """The exposition text: every worker's counters (multiprocess mode) or this one's, plus `snapshot`."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        counters = generate_latest(registry)
    else:
        counters = generate_latest(REGISTRY)
    scrape = CollectorRegistry()
    scrape.register(_Snapshot(snapshot))
    return counters + generate_latest(scrape)
