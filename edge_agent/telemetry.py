"""Periodic telemetry on ``edgefed/v1/{device}/telemetry``: what the agent did since it started.

A daemon thread builds one ``shared.messages.Telemetry`` from the live components every
``interval_s`` and publishes it with QoS 0 (the next one supersedes a lost one) while connected.
``current_model`` carries the served version's own counters (requests, model failures, escalations,
cloud answers and how many agreed with the edge, local p99) and ``update_error`` why the last
assigned bundle was refused: the hub's rollout gates are computed from these.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from shared import topics
from shared.messages import Telemetry
from shared.mqtt import MqttClient, MqttError

if TYPE_CHECKING:
    from edge_agent.service import EdgeService

__all__ = ["TelemetryPublisher", "snapshot"]

_MAX_ERROR_CHARS = 500

log = logging.getLogger(__name__)


def snapshot(service: EdgeService, *, region: str = "", started: float | None = None) -> Telemetry:
    """The current counters of ``service`` as one telemetry message."""
    stats = service.stats()
    esc = service.escalator.stats() if service.escalator is not None else None
    return Telemetry(
        device_id=service.device_id,
        region=region,
        model_name=service.runtime.name,
        model_version=service.runtime.version,
        policy=service.policy.name,
        requests=stats.requests,
        edge=stats.edge,
        cloud=stats.cloud,
        fallback=stats.fallback,
        escalations_sent=esc.sent if esc else 0,
        escalation_timeouts=esc.timeouts if esc else 0,
        late_answers=esc.late if esc else 0,
        duplicate_answers=esc.duplicates if esc else 0,
        outbox_depth=len(service.outbox) if service.outbox is not None else 0,
        outbox_evicted=service.outbox.dropped if service.outbox is not None else 0,
        breaker=service.breaker.state if service.breaker is not None else "closed",
        local_latency_ms=service.local_latency.percentiles(),
        cloud_latency_ms=service.cloud_latency.percentiles(),
        learning_cases=len(service.learning) if service.learning is not None else 0,
        uptime_s=round(time.monotonic() - started, 3) if started is not None else 0.0,
        current_model=service.model_health.snapshot(),
        update_error=(service.update_error or "")[:_MAX_ERROR_CHARS],
    )


class TelemetryPublisher:
    """Publishes ``snapshot(service)`` every ``interval_s`` seconds; ``start``/``stop`` the thread."""

    def __init__(self, mqtt: MqttClient, service: EdgeService, *, interval_s: float, region: str = "") -> None:
        if interval_s <= 0:
            raise ValueError(f"telemetry interval must be > 0 s, got {interval_s}")
        self.mqtt = mqtt
        self.service = service
        self.interval_s = interval_s
        self.region = region
        self.sent = 0
        self._started = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="telemetry", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None

    def publish_now(self) -> bool:
        """Publish one snapshot if connected; True if it was handed to the client."""
        if not self.mqtt.connected:
            return False
        msg = snapshot(self.service, region=self.region, started=self._started)
        try:
            self.mqtt.publish(topics.telemetry(self.service.device_id), msg.model_dump_json().encode(), qos=0)
        except (MqttError, RuntimeError) as exc:
            log.debug("telemetry not published: %s", exc)
            return False
        self.sent += 1
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.publish_now()
            except Exception:  # telemetry must never take the agent down
                log.exception("telemetry snapshot failed")
