"""Health counters of the model being served, since it started serving (the rollout gates' inputs).

``EdgeService`` holds one ``ModelHealthCounter`` per served model and replaces it on every swap, so
the counters, and the local latency window behind the p99, describe one version only.
"""

from __future__ import annotations

import threading
import time

from edge_agent.latency import LatencyWindow
from shared.messages import ModelHealth

__all__ = ["ModelHealthCounter"]


class ModelHealthCounter:
    """Thread-safe counters for one model version; ``snapshot()`` is what telemetry carries."""

    def __init__(self, version: str) -> None:
        self.version = version
        self.since = time.time()
        self.latency = LatencyWindow()
        self._lock = threading.Lock()
        self._requests = self._errors = self._escalated = self._answers = self._agreed = 0

    def answered_locally(self, latency_ms: float) -> None:
        """The model ran on one case in ``latency_ms``."""
        self.latency.add(latency_ms)
        with self._lock:
            self._requests += 1

    def failed(self) -> None:
        """The model failed to run on a case (not the caller's bad input)."""
        with self._lock:
            self._requests += 1
            self._errors += 1

    def escalated(self) -> None:
        with self._lock:
            self._escalated += 1

    def cloud_answered(self, agrees: bool) -> None:
        """The hub answered an escalated case; ``agrees``: its label is the edge model's."""
        with self._lock:
            self._answers += 1
            self._agreed += int(agrees)

    def snapshot(self) -> ModelHealth:
        with self._lock:
            counts = (self._requests, self._errors, self._escalated, self._answers, self._agreed)
        return ModelHealth(
            version=self.version,
            since=self.since,
            requests=counts[0],
            errors=counts[1],
            escalated=counts[2],
            cloud_answers=counts[3],
            agreed=counts[4],
            local_p99_ms=self.latency.percentiles((99,))["p99"],
        )
