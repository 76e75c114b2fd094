"""Certainty scores of one case from the edge model's class probabilities, all in [0, 1].

Every score reads "higher is surer", so every rule is the same comparison (escalate iff score <
threshold) and the budget policy can calibrate a threshold on any of them:

- ``confidence``: the top class probability (max softmax);
- ``margin``: top-1 minus top-2 probability;
- ``entropy``: 1 - normalised entropy, Sedna's CrossEntropyFilter score (1 + sum p log p / log K).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import numpy as np

__all__ = ["SCORES", "ScoreName", "ScoreError", "confidence", "entropy_score", "margin", "score_fn"]

ScoreName = Literal["confidence", "margin", "entropy"]


class ScoreError(ValueError):
    """The probabilities cannot be scored (empty, or not finite); no escalation decision was made."""


def _probs(probabilities: np.ndarray) -> np.ndarray:
    p = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    if p.size == 0:
        raise ScoreError("probabilities are empty; cannot decide on escalation")
    if not np.isfinite(p).all():
        raise ScoreError("probabilities hold NaN or infinite values; cannot decide on escalation")
    return p


def confidence(probabilities: np.ndarray) -> float:
    """The largest class probability of one case (max softmax)."""
    return float(_probs(probabilities).max())


def margin(probabilities: np.ndarray) -> float:
    """Top-1 minus top-2 class probability; 1.0 for a single class."""
    p = _probs(probabilities)
    if p.size == 1:
        return 1.0
    top2 = np.partition(p, -2)[-2:]
    return float(top2[1] - top2[0])


def entropy_score(probabilities: np.ndarray) -> float:
    """1 - (entropy / log K): 1 for a one-hot answer, 0 for a uniform one."""
    p = _probs(probabilities)
    if p.size == 1:
        return 1.0
    nz = p[p > 0]
    h = float(-(nz * np.log(nz)).sum())
    return float(min(1.0, max(0.0, 1.0 - h / math.log(p.size))))


SCORES: dict[str, Callable[[np.ndarray], float]] = {
    "confidence": confidence,
    "margin": margin,
    "entropy": entropy_score,
}


def score_fn(name: str) -> Callable[[np.ndarray], float]:
    """The score registered as ``name``; ScoreError names the choices."""
    fn = SCORES.get(name)
    if fn is None:
        raise ScoreError(f"unknown certainty score {name!r}; choose one of: {', '.join(SCORES)}")
    return fn
