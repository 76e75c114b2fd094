"""The budget policy: escalate a target share of cases (e.g. 10 %), whatever the score distribution.

It escalates iff a case's certainty score (``edge_agent.scores``) is below a threshold: the
``level`` quantile of the scores it expects, where ``level`` is the target rate plus a bounded
correction.

1. Until ``min_samples`` live cases have been seen (at start and after every model swap), the
   quantile comes from the bundle's calibration quantiles for its score when the manifest carries
   them, else the configured fallback threshold is used.
2. From then on it is the exact quantile of the last ``window`` live scores (a sorted sliding
   window, so every case is decided against the current window). Ties at the threshold (many cases
   with the same score) are split at random in the right proportion, so a rate between two tied
   scores is reachable too.
3. The correction closes the loop on what the site pays for: the realised count. ``deficit`` is
   ``target x cases - escalated`` over the last ``window`` decisions, and the level is
   ``target + deficit / horizon``, clipped to ``target ± max_adjust``. A quantile estimated from a
   few hundred cases is a few points off (its sampling error); the deficit term repays that error
   over about ``horizon`` cases, so the realised rate converges onto the target instead of
   inheriting the estimate's error, while the clip bounds how far one burst can move the rate.
"""

from __future__ import annotations

import bisect
import random
import threading
from collections import deque

import numpy as np

from edge_agent.scores import ScoreName, score_fn
from shared.bundle.manifest import BundleMetrics

__all__ = ["BudgetPolicy", "calibration_quantiles", "threshold_from_quantiles"]

_FIELDS: dict[str, str] = {
    "confidence": "calibration_confidence_quantiles",
    "margin": "calibration_margin_quantiles",
    "entropy": "calibration_entropy_quantiles",
}


def calibration_quantiles(metrics: BundleMetrics | None, score: str) -> list[float] | None:
    """The manifest's quantiles for ``score`` if present and usable (>= 2 finite, ascending values)."""
    if metrics is None:
        return None
    values = getattr(metrics, _FIELDS[score], None)
    if not values or len(values) < 2:
        return None
    q = np.asarray(values, dtype=np.float64)
    if not np.isfinite(q).all() or (np.diff(q) < -1e-9).any():
        return None
    return [float(v) for v in q]


def threshold_from_quantiles(quantiles: list[float], rate: float) -> float:
    """The score below which a share ``rate`` of cases falls, interpolated between evenly spaced quantiles."""
    levels = np.linspace(0.0, 1.0, len(quantiles))
    return float(np.interp(rate, levels, quantiles))


class BudgetPolicy:
    """Escalate about ``target_rate`` of the cases: the ones with the lowest certainty score."""

    def __init__(
        self,
        target_rate: float,
        *,
        score: ScoreName = "confidence",
        calibration: BundleMetrics | None = None,
        fallback_threshold: float = 0.8,
        window: int = 1000,
        min_samples: int = 50,
        horizon: float = 50.0,
        max_adjust: float | None = None,
        seed: int = 0,
    ) -> None:
        if not 0.0 <= target_rate <= 1.0:
            raise ValueError(f"budget target rate {target_rate!r} is outside [0, 1]; use e.g. 0.1 for 10 %")
        if window < 10 or min_samples < 1 or min_samples > window:
            raise ValueError(f"budget window {window} / min_samples {min_samples}: need 1 <= min <= window, >= 10")
        if horizon < 1.0:
            raise ValueError(f"budget horizon {horizon!r} must be at least 1 case")
        self.name = "budget"
        self.score = score
        self.target_rate = float(target_rate)
        self._score = score_fn(score)
        self._fallback = float(fallback_threshold)
        self._min_samples = min_samples
        self._horizon = float(horizon)
        # Default bound: the level stays within target ± max(5 pt, half the target).
        self.max_adjust = float(max_adjust) if max_adjust is not None else max(0.05, 0.5 * self.target_rate)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._scores: deque[float] = deque(maxlen=window)
        self._sorted: list[float] = []
        self._decisions: deque[bool] = deque(maxlen=window)
        self._escalated = 0
        self._quantiles: list[float] | None = None
        self.source = "fallback"
        self.threshold = self._fallback
        self.level = self.target_rate
        self.calibrate(calibration)

    def calibrate(self, metrics: BundleMetrics | None) -> None:
        """Start over from a (new) bundle's calibration statistics: live scores of the old model no longer apply."""
        quantiles = calibration_quantiles(metrics, self.score)
        with self._lock:
            self._scores.clear()
            self._sorted.clear()
            self._decisions.clear()
            self._escalated = 0
            self._quantiles = quantiles
            self.level = self.target_rate
            if quantiles is not None:
                self.threshold = threshold_from_quantiles(quantiles, self.target_rate)
                self.source = "calibration"
            else:
                self.threshold = self._fallback
                self.source = "fallback"

    @property
    def live_rate(self) -> float | None:
        """The share of the last ``window`` cases that were escalated; None before any case."""
        with self._lock:
            return (self._escalated / len(self._decisions)) if self._decisions else None

    @property
    def deficit(self) -> float:
        """Escalations owed to the budget over the last ``window`` cases (negative: escalated too many)."""
        with self._lock:
            return self.target_rate * len(self._decisions) - self._escalated

    def should_escalate(self, probabilities: np.ndarray) -> bool:
        s = self._score(probabilities)
        with self._lock:
            deficit = self.target_rate * len(self._decisions) - self._escalated
            adjust = min(self.max_adjust, max(-self.max_adjust, deficit / self._horizon))
            self.level = min(1.0, max(0.0, self.target_rate + adjust))
            escalate = self._decide(s)
            self._record(s, escalate)
        return escalate

    def _decide(self, s: float) -> bool:
        """Escalate ``s`` at the current level: against the live window, the calibration, or the fallback."""
        level, n = self.level, len(self._sorted)
        if n < self._min_samples:
            if self._quantiles is not None:
                self.threshold = threshold_from_quantiles(self._quantiles, level)
            return s < self.threshold
        self.source = "live"
        if level <= 0.0:
            self.threshold = -1.0  # scores are >= 0: nothing escalates
            return False
        want = level * n  # how many of the window's scores should fall below the cut
        k = int(want)
        if k >= n:
            self.threshold = 2.0  # scores are <= 1: everything escalates
            return True
        v = self._sorted[k]
        self.threshold = v
        if s != v:
            return s < v
        below = bisect.bisect_left(self._sorted, v)
        tied = bisect.bisect_right(self._sorted, v) - below
        return self._rng.random() < (want - below) / tied

    def _record(self, s: float, escalate: bool) -> None:
        if len(self._scores) == self._scores.maxlen:
            old = self._scores[0]
            del self._sorted[bisect.bisect_left(self._sorted, old)]
            self._escalated -= self._decisions[0]
        self._scores.append(s)
        bisect.insort(self._sorted, s)
        self._decisions.append(escalate)
        self._escalated += escalate
