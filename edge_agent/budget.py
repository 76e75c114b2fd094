"""The budget policy: escalate a target share of cases (e.g. 10 %), whatever the score distribution.

It escalates iff a case's certainty score (``edge_agent.scores``) is below a threshold, and it
chooses that threshold as the ``target_rate`` quantile of the scores it expects:

1. at start (and after every model swap) from the bundle's calibration quantiles for its score,
   when the manifest carries them; else from the configured fallback threshold;
2. once ``min_samples`` live cases have been seen, from the scores of the last ``window`` live
   cases, so the live rate stays on target as the traffic drifts away from the calibration split.

A small integral correction nudges the quantile when ties (many cases with the same score) make the
window quantile over- or under-shoot: the live rate, not the calibration, is what the site pays for.
"""

from __future__ import annotations

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
        gain: float = 0.05,
    ) -> None:
        if not 0.0 <= target_rate <= 1.0:
            raise ValueError(f"budget target rate {target_rate!r} is outside [0, 1]; use e.g. 0.1 for 10 %")
        if window < 10 or min_samples < 1 or min_samples > window:
            raise ValueError(f"budget window {window} / min_samples {min_samples}: need 1 <= min <= window, >= 10")
        self.name = "budget"
        self.score = score
        self.target_rate = float(target_rate)
        self._score = score_fn(score)
        self._fallback = float(fallback_threshold)
        self._min_samples = min_samples
        self._gain = gain
        self._lock = threading.Lock()
        self._scores: deque[float] = deque(maxlen=window)
        self._decisions: deque[bool] = deque(maxlen=window)
        self._correction = 0.0
        self._since_update = 0
        self.source = "fallback"
        self.threshold = self._fallback
        self.calibrate(calibration)

    def calibrate(self, metrics: BundleMetrics | None) -> None:
        """Start over from a (new) bundle's calibration statistics: live scores of the old model no longer apply."""
        quantiles = calibration_quantiles(metrics, self.score)
        with self._lock:
            self._scores.clear()
            self._decisions.clear()
            self._correction = 0.0
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
            return (sum(self._decisions) / len(self._decisions)) if self._decisions else None

    def should_escalate(self, probabilities: np.ndarray) -> bool:
        s = self._score(probabilities)
        with self._lock:
            escalate = s < self.threshold
            self._scores.append(s)
            self._decisions.append(escalate)
            self._since_update += 1
            # Re-estimating on every case would cost a sort of the window per request.
            if len(self._scores) >= self._min_samples and self._since_update >= 10:
                self._since_update = 0
                self._update()
        return escalate

    def _update(self) -> None:
        live = sum(self._decisions) / len(self._decisions)
        self._correction += self._gain * (self.target_rate - live)
        self._correction = float(np.clip(self._correction, -0.5, 0.5))
        level = float(np.clip(self.target_rate + self._correction, 0.0, 1.0))
        if level <= 0.0:
            self.threshold = -1.0  # scores are >= 0: nothing escalates
        elif level >= 1.0:
            self.threshold = 2.0  # scores are <= 1: everything escalates
        else:
            # The smallest threshold with about ``level`` of the window strictly below it.
            self.threshold = float(np.quantile(np.fromiter(self._scores, float), level, method="higher"))
        self.source = "live"
