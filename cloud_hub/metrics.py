"""Prometheus metrics of one hub app, in its own registry (never the process-global one), so two
apps in one process, as in tests, do not collide."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

__all__ = ["FleetCollector", "HubMetrics"]

log = logging.getLogger(__name__)

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


class _Counts(Protocol):
    answered: int
    errors: int


class FleetCollector:
    """Per-device metrics, read when /metrics is scraped (never on the escalation path):

    - ``edgefed_hub_device_escalations_total{device_id, region, model_name, model_version, outcome}``:
      escalations this process answered (``outcome="answered"``) or refused (``"error"``) since it
      started, by the device and the edge model version that escalated; several hub workers each
      export their own, to be summed.
    - ``edgefed_hub_devices{region}`` and ``edgefed_hub_devices_online{region}``: the registered fleet
      and the devices whose retained status says online (API hub only: one database, one exporter).
    """

    def __init__(
        self,
        totals: Callable[[], dict[tuple[str, str, str, str], _Counts]],
        regions: Callable[[], dict[str, tuple[int, int]]] | None = None,
    ) -> None:
        self._totals = totals
        self._regions = regions

    def collect(self) -> Iterator[Metric]:
        esc = CounterMetricFamily(
            "edgefed_hub_device_escalations",
            "Escalations answered or refused by this hub process, by device and escalating edge model version.",
            labels=["device_id", "region", "model_name", "model_version", "outcome"],
        )
        for (device, region, name, version), c in sorted(self._totals().items()):
            esc.add_metric([device, region, name, version, "answered"], c.answered)
            esc.add_metric([device, region, name, version, "error"], c.errors)
        yield esc
        if self._regions is None:
            return
        try:
            by_region = self._regions()
        except Exception:  # the database may be briefly unavailable: the scrape still gets the rest
            log.warning("could not count devices for /metrics", exc_info=True)
            return
        registered = GaugeMetricFamily("edgefed_hub_devices", "Registered devices by region.", labels=["region"])
        online = GaugeMetricFamily(
            "edgefed_hub_devices_online", "Devices whose retained status is online, by region.", labels=["region"]
        )
        for region, (total, up) in sorted(by_region.items()):
            registered.add_metric([region], total)
            online.add_metric([region], up)
        yield registered
        yield online
