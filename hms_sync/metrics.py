"""Prometheus metrics, on a registry of our own so tests and several engines don't clash."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.webhooks = Counter(
            "hms_sync_webhooks", "Webhook deliveries received", ["source", "result"], registry=r
        )
        self.writes = Counter(
            "hms_sync_writes", "Writes made to a system", ["system", "kind"], registry=r
        )
        self.errors = Counter("hms_sync_errors", "Errors by kind", ["kind"], registry=r)
        self.reconciles = Counter(
            "hms_sync_reconciles", "Reconciles by outcome", ["outcome"], registry=r
        )
        self.queue_depth = Gauge("hms_sync_queue_depth", "Orders waiting in the queue", registry=r)
        self.dead_letters = Gauge("hms_sync_dead_letters", "Orders given up on", registry=r)
        self.reconcile_seconds = Histogram(
            "hms_sync_reconcile_seconds", "Time to reconcile one order",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.propagation_seconds = Histogram(
            "hms_sync_propagation_seconds",
            "Time from a change in one system to the other system holding it",
            ["direction"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.last_poll = Gauge(
            "hms_sync_last_successful_poll_timestamp_seconds",
            "Unix time of the last successful poll", ["system"], registry=r,
        )

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
