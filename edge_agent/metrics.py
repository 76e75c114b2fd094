"""``GET /metrics``: the agent's counters and gauges in the Prometheus text format.

A collector reads the live components at scrape time (service, escalation client, outbox, breaker,
learning store) instead of keeping a second set of counters that could drift from the first. Each
agent has its own registry, so several agents in one process (tests) do not collide.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from edge_agent.breaker import STATE_CODES
from edge_agent.latency import LatencyWindow
from edge_agent.service import EdgeService

__all__ = ["CONTENT_TYPE", "AgentCollector", "render_metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class AgentCollector(Collector):
    """Prometheus view of one ``EdgeService`` and the parts it holds."""

    def __init__(self, service: EdgeService) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        svc = self.service
        stats = svc.stats()
        requests = CounterMetricFamily("edgefed_agent_requests", "Cases answered, by who answered", labels=["source"])
        for source, value in (("edge", stats.edge), ("cloud", stats.cloud), ("edge-fallback", stats.fallback)):
            requests.add_metric([source], value)
        yield requests
        yield _counter(
            "edgefed_agent_short_circuited", "Escalations held back by the open breaker", stats.short_circuited
        )
        yield _counter(
            "edgefed_agent_late_answers_applied",
            "Cloud answers applied after the caller was answered",
            stats.late_applied,
        )
        yield _counter("edgefed_agent_feedback", "Inspector labels kept", stats.feedback)
        if svc.escalator is not None:
            esc = CounterMetricFamily("edgefed_agent_escalations", "Escalation outcomes", labels=["outcome"])
            for outcome, value in asdict(svc.escalator.stats()).items():
                esc.add_metric([outcome], value)
            yield esc
            yield _gauge(
                "edgefed_agent_broker_connected", "1 while connected to the broker", int(svc.escalator.connected)
            )
        for name, window in (("local", svc.local_latency), ("cloud", svc.cloud_latency)):
            yield from _latency(name, window)
        if svc.outbox is not None:
            yield _gauge("edgefed_agent_outbox_depth", "Escalations waiting on disk", len(svc.outbox))
            yield _counter("edgefed_agent_outbox_delivered", "Queued escalations answered", svc.outbox.delivered)
            yield _counter(
                "edgefed_agent_outbox_evicted", "Queued escalations dropped (outbox full)", svc.outbox.dropped
            )
        if svc.breaker is not None:
            yield _gauge(
                "edgefed_agent_breaker_state",
                "Escalation breaker: 0 closed, 1 half-open, 2 open",
                STATE_CODES[svc.breaker.state],
            )
            yield _counter("edgefed_agent_breaker_opened", "Times the breaker opened", svc.breaker.opened)
        if svc.learning is not None:
            yield _gauge("edgefed_agent_learning_cases", "Cases in the local learning store", len(svc.learning))
            yield _counter(
                "edgefed_agent_learning_evicted",
                "Learning cases dropped by size or retention",
                svc.learning.evicted + svc.learning.expired,
            )
        rate = getattr(svc.policy, "live_rate", None)
        if rate is not None:
            yield _gauge("edgefed_agent_policy_live_escalation_rate", "Share of recent cases escalated", rate)
        info = InfoMetricFamily("edgefed_agent_model", "The model being served")
        info.add_metric([], {"name": svc.runtime.name, "version": svc.runtime.version, "policy": svc.policy.name})
        yield info


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _latency(name: str, window: LatencyWindow) -> Iterator[Metric]:
    g = GaugeMetricFamily(
        f"edgefed_agent_{name}_latency_ms", f"{name} latency percentiles over recent cases", labels=["quantile"]
    )
    for q, v in window.percentiles().items():
        if v is not None:
            g.add_metric([q], v)
    yield g
    yield _counter(f"edgefed_agent_{name}_latency_ms_sum", f"Total {name} latency", window.total_ms)
    yield _counter(f"edgefed_agent_{name}_latency_samples", f"{name} latency samples", window.count)


def render_metrics(service: EdgeService) -> bytes:
    """The text exposition for ``service`` (a fresh registry per scrape costs microseconds)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(service))
    return generate_latest(registry)
