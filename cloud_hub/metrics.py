"""Prometheus metrics of one hub app, in its own registry (never the process-global one), so two
apps in one process, as in tests, do not collide."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

__all__ = ["HubMetrics"]

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class HubMetrics:
    """Every metric the hub exports; ``render()`` gives the Prometheus text exposition."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.escalations_received = Counter(
            "edgefed_hub_escalations_received", "Escalation messages received over MQTT.", registry=r
        )
        # Labelled by task only once a loaded model accepted the case: untrusted tasks stay out of labels.
        self.escalations_answered = Counter(
            "edgefed_hub_escalations_answered", "Escalations answered by a cloud model.", ["task"], registry=r
        )
        self.escalation_errors = Counter(
            "edgefed_hub_escalation_errors",
            "Escalations answered with an error (or dropped when no answer was possible), by error kind.",
            ["kind"],
            registry=r,
        )
        self.inference_latency = Histogram(
            "edgefed_hub_inference_latency_seconds",
            "Model time per batch.",
            ["task"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "edgefed_hub_batch_size",
            "Samples per inference batch.",
            ["task"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.http_requests = Counter(
            "edgefed_hub_http_requests",
            "HTTP requests by route template and status.",
            ["method", "route", "status"],
            registry=r,
        )
        self.models_loaded = Gauge(
            "edgefed_hub_cloud_models_loaded", "Cloud models loaded for inference.", registry=r
        )
        # Dynamic batcher (cloud_hub.inference.batcher): wait before a batch runs, backlog, refusals.
        self.queue_delay = Histogram(
            "edgefed_hub_queue_delay_seconds",
            "Time a request waited in the inference queue before its batch started.",
            ["task"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "edgefed_hub_inference_queue_depth", "Requests waiting in the inference queue.", registry=r
        )
        self.inference_errors = Counter(
            "edgefed_hub_inference_errors",
            "Inference requests answered with an error (queue_full, deadline_exceeded, inference_failed, ...).",
            ["kind"],
            registry=r,
        )

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
