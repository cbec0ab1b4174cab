"""Prometheus metrics of one gateway (its own registry: two apps in one process do not collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# from a local forward (milliseconds) to Prefect having been down for minutes
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)


class GatewayMetrics:
    """The gateway's counters, gauge and histogram, prefixed ``runbooks_gateway_``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.received = Counter(
            "runbooks_gateway_alerts_received",
            "Alerts received in valid, authenticated notifications.",
            ["source"],
            registry=self.registry,
        )
        self.rejected = Counter(
            "runbooks_gateway_requests_rejected",
            "Requests refused, by reason (unauthorized, content_type, too_large, bad_json, schema).",
            ["reason"],
            registry=self.registry,
        )
        self.deduplicated = Counter(
            "runbooks_gateway_alerts_deduplicated",
            "Alerts not forwarded: re-sent (duplicate) or within the fingerprint's cooldown.",
            ["reason"],
            registry=self.registry,
        )
        self.forwarded = Counter(
            "runbooks_gateway_events_forwarded",
            "Events Prefect acknowledged.",
            registry=self.registry,
        )
        self.forward_failures = Counter(
            "runbooks_gateway_forward_failures",
            "Failed deliveries to Prefect, by reason (unreachable, timeout, http_<status>, rejected).",
            ["reason"],
            registry=self.registry,
        )
        self.spool_depth = Gauge(
            "runbooks_gateway_spool_depth",
            "Accepted events not yet delivered to Prefect.",
            registry=self.registry,
        )
        self.forward_latency = Histogram(
            "runbooks_gateway_forward_latency_seconds",
            "From the alert's acceptance to Prefect acknowledging its event.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
