"""Prometheus metrics of one ingress replica, rendered at GET /metrics (with the batch sizes of the
model replica that answers; serving/generator.py). Ray Serve's own request metrics (all replicas)
are on Ray's metrics export port as well."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("llm_requests", "HTTP requests", ["route", "status"], registry=self.registry)
        self.latency = Histogram(
            "llm_request_latency_seconds",
            "request latency",
            ["route"],
            registry=self.registry,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
        )
        self.tokens = Counter("llm_tokens", "tokens processed", ["kind"], registry=self.registry)
        self.queue = Gauge("llm_queue_length", "requests waiting or running in this replica", registry=self.registry)
        self.retries = Counter(
            "llm_replica_retries", "calls retried because a model replica died", registry=self.registry
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
