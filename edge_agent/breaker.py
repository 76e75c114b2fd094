"""Circuit breaker for escalations: stop asking a hub that does not answer in time.

``closed``: escalations go out. After ``failures`` consecutive bad escalations (no answer within the
timeout, or an answer slower than ``latency_budget_ms``) it turns ``open``: cases are answered at the
edge and queued in the outbox, so callers stop paying the timeout. After ``cooldown_s`` it turns
``half-open`` and lets one escalation through as a probe; a good probe closes it, a bad one opens
it again for another cool-down. Thread-safe: the event loop and the outbox sender both use it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Literal

__all__ = ["BreakerState", "CircuitBreaker"]

log = logging.getLogger(__name__)

BreakerState = Literal["closed", "open", "half-open"]
STATE_CODES: dict[str, int] = {"closed": 0, "half-open": 1, "open": 2}


class CircuitBreaker:
    """Consecutive-failure breaker with a cool-down and a single probe."""

    def __init__(
        self,
        *,
        failures: int = 5,
        cooldown_s: float = 10.0,
        latency_budget_ms: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failures < 1:
            raise ValueError(f"breaker failures must be >= 1, got {failures}")
        if cooldown_s <= 0:
            raise ValueError(f"breaker cool-down must be > 0 s, got {cooldown_s}")
        self.failures = failures
        self.cooldown_s = cooldown_s
        self.latency_budget_ms = latency_budget_ms
        self._clock = clock
        self._lock = threading.Lock()
        self._state: BreakerState = "closed"
        self._consecutive = 0
        self._opened_at = 0.0
        self._probe_out = False
        self.opened = 0  # times it opened since start
        self.short_circuited = 0  # escalations it held back

    @property
    def state(self) -> BreakerState:
        with self._lock:
            return self._current()

    def allow(self) -> bool:
        """May one escalation go out now? In half-open only one probe at a time may."""
        with self._lock:
            state = self._current()
            if state == "closed":
                return True
            if state == "half-open" and not self._probe_out:
                self._probe_out = True
                return True
            self.short_circuited += 1
            return False

    def record(self, ok: bool, latency_ms: float | None = None) -> None:
        """The outcome of one escalation that went out: answered (with its round trip) or not."""
        slow = ok and self.latency_budget_ms is not None and latency_ms is not None
        if slow and latency_ms > self.latency_budget_ms:  # type: ignore[operator]
            ok = False
        with self._lock:
            state = self._current()
            self._probe_out = False
            if ok:
                self._consecutive = 0
                if state != "closed":
                    log.info("escalation circuit closed: the hub answers again")
                self._state = "closed"
                return
            self._consecutive += 1
            if state == "half-open" or (state == "closed" and self._consecutive >= self.failures):
                self._state = "open"
                self._opened_at = self._clock()
                self.opened += 1
                log.warning(
                    "escalation circuit open after %d failed escalation(s): answering at the edge and "
                    "queueing cases for %.1f s, then probing",
                    self._consecutive,
                    self.cooldown_s,
                )

    def _current(self) -> BreakerState:
        if self._state == "open" and self._clock() - self._opened_at >= self.cooldown_s:
            self._state = "half-open"
            self._probe_out = False
        return self._state
