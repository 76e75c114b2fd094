"""Escalation policies: given the edge model's class probabilities, ask the cloud or not.

A policy is anything with a ``name`` and ``should_escalate(probabilities) -> bool``; policies are
built by name with ``make_policy`` from one ``PolicyConfig``:

- ``threshold``: escalate iff the top class probability is below ``threshold``;
- ``margin``: escalate iff top-1 minus top-2 probability is below ``threshold``;
- ``entropy``: escalate iff 1 - normalised entropy is below ``threshold`` (Sedna's CrossEntropyFilter);
- ``budget``: escalate the ``budget_rate`` share of least certain cases (``edge_agent.budget``);
- ``edge-only`` / ``cloud-only``: never / always, for comparison.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from edge_agent.budget import BudgetPolicy
from edge_agent.scores import ScoreError, ScoreName, score_fn
from edge_agent.scores import confidence as _confidence
from shared.bundle.manifest import BundleMetrics

__all__ = [
    "POLICIES",
    "BudgetPolicy",
    "CloudOnlyPolicy",
    "EdgeOnlyPolicy",
    "Policy",
    "PolicyConfig",
    "PolicyError",
    "ScorePolicy",
    "ThresholdPolicy",
    "make_policy",
    "max_confidence",
    "validate_threshold",
]


class PolicyError(ValueError):
    """A policy name or parameter is invalid; the agent does not start with it."""


class Policy(Protocol):
    """Decides whether one case goes to the cloud."""

    name: str

    def should_escalate(self, probabilities: np.ndarray) -> bool: ...


class PolicyConfig(BaseModel):
    """Which policy, and its parameters (those a policy does not use are ignored)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "threshold"
    threshold: float = 0.8
    budget_rate: float = Field(default=0.1, ge=0.0, le=1.0)
    budget_score: ScoreName = "confidence"
    budget_window: int = Field(default=1000, ge=10)


def validate_threshold(threshold: float) -> float:
    """Return ``threshold`` as a float or raise PolicyError: it must be a number in [0, 1]."""
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        raise PolicyError(f"threshold {threshold!r} is not a number; use a value in [0, 1]") from None
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise PolicyError(f"threshold {threshold!r} is outside [0, 1]; use e.g. 0.8")
    return value


def max_confidence(probabilities: np.ndarray) -> float:
    """The largest class probability of one case (max softmax)."""
    try:
        return _confidence(probabilities)
    except ScoreError as exc:
        raise PolicyError(str(exc)) from None


@dataclass(frozen=True)
class ScorePolicy:
    """Escalate iff the case's certainty score (``edge_agent.scores``) is below ``threshold``.

    ``threshold=0`` never escalates; ``threshold=1`` escalates everything short of certainty.
    """

    threshold: float
    score: ScoreName = "confidence"
    name: str = "threshold"

    def __post_init__(self) -> None:
        object.__setattr__(self, "threshold", validate_threshold(self.threshold))
        score_fn(self.score)

    def should_escalate(self, probabilities: np.ndarray) -> bool:
        try:
            return score_fn(self.score)(probabilities) < self.threshold
        except ScoreError as exc:
            raise PolicyError(str(exc)) from None


# The max-softmax rule is the score policy's default.
ThresholdPolicy = ScorePolicy


@dataclass(frozen=True)
class EdgeOnlyPolicy:
    """Never escalate: the edge model answers everything (offline sites, baselines)."""

    name: str = "edge-only"

    def should_escalate(self, probabilities: np.ndarray) -> bool:
        return False


@dataclass(frozen=True)
class CloudOnlyPolicy:
    """Escalate everything: the cloud answers when it can, the edge only as a fallback."""

    name: str = "cloud-only"

    def should_escalate(self, probabilities: np.ndarray) -> bool:
        return True


def _budget(cfg: PolicyConfig, calibration: BundleMetrics | None) -> Policy:
    return BudgetPolicy(
        cfg.budget_rate,
        score=cfg.budget_score,
        calibration=calibration,
        fallback_threshold=cfg.threshold,
        window=cfg.budget_window,
        min_samples=min(50, cfg.budget_window),
    )


POLICIES: dict[str, Callable[[PolicyConfig, BundleMetrics | None], Policy]] = {
    "threshold": lambda c, m: ScorePolicy(c.threshold, "confidence", "threshold"),
    "margin": lambda c, m: ScorePolicy(c.threshold, "margin", "margin"),
    "entropy": lambda c, m: ScorePolicy(c.threshold, "entropy", "entropy"),
    "budget": _budget,
    "edge-only": lambda c, m: EdgeOnlyPolicy(),
    "cloud-only": lambda c, m: CloudOnlyPolicy(),
}


def make_policy(
    name: str | PolicyConfig,
    threshold: float = 0.8,
    *,
    calibration: BundleMetrics | None = None,
) -> Policy:
    """Build a policy from a config (or a name and threshold); PolicyError names the valid choices.

    ``calibration`` is the serving bundle's ``manifest.metrics`` (the budget policy reads it).
    """
    if isinstance(name, PolicyConfig):
        cfg = name
    else:
        validate_threshold(threshold)
        cfg = PolicyConfig(name=name, threshold=threshold)
    factory = POLICIES.get(cfg.name)
    if factory is None:
        raise PolicyError(f"unknown escalation policy {cfg.name!r}; choose one of: {', '.join(POLICIES)}")
    validate_threshold(cfg.threshold)
    try:
        return factory(cfg, calibration)
    except (ValueError, ScoreError) as exc:
        raise PolicyError(f"policy {cfg.name!r}: {exc}") from None
