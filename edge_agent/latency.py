"""A bounded window of recent latencies with percentiles, for telemetry and /metrics."""

from __future__ import annotations

import threading
from collections import deque

import numpy as np

__all__ = ["LatencyWindow"]


class LatencyWindow:
    """The last ``size`` samples (milliseconds); thread-safe, constant memory."""

    def __init__(self, size: int = 2048) -> None:
        self._samples: deque[float] = deque(maxlen=size)
        self._lock = threading.Lock()
        self.count = 0
        self.total_ms = 0.0

    def add(self, ms: float) -> None:
        with self._lock:
            self._samples.append(ms)
            self.count += 1
            self.total_ms += ms

    def percentiles(self, qs: tuple[float, ...] = (50, 90, 99)) -> dict[str, float | None]:
        """``{"p50": ..., "p90": ..., "p99": ...}`` over the window; None while empty."""
        with self._lock:
            data = np.fromiter(self._samples, float) if self._samples else None
        if data is None:
            return {f"p{q:g}": None for q in qs}
        values = np.percentile(data, qs)
        return {f"p{q:g}": round(float(v), 3) for q, v in zip(qs, values, strict=True)}
