"""Escalation policies: given the edge model's class probabilities, ask the cloud or not.

A policy is anything with a ``name`` and ``should_escalate(probabilities) -> bool``; policies are
looked up by name in ``POLICIES`` so a new one (a budget controller, an entropy rule) is one class
and one registry entry. The decision functions are pure so they can be tested as pure functions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

__all__ = [
    "POLICIES",
    "CloudOnlyPolicy",
    "EdgeOnlyPolicy",
    "Policy",
    "PolicyError",
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
    p = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    if p.size == 0:
        raise PolicyError("probabilities are empty; cannot decide on escalation")
    return float(p.max())


@dataclass(frozen=True)
class ThresholdPolicy:
    """Escalate iff the edge model's max-softmax confidence is below ``threshold``.

    ``threshold=0`` never escalates; ``threshold=1`` escalates everything short of certainty.
    """

    threshold: float
    name: str = "threshold"

    def __post_init__(self) -> None:
        object.__setattr__(self, "threshold", validate_threshold(self.threshold))

    def should_escalate(self, probabilities: np.ndarray) -> bool:
        return max_confidence(probabilities) < self.threshold


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


# name -> factory taking the configured threshold (policies that do not need it ignore it).
POLICIES: dict[str, Callable[[float], Policy]] = {
    "threshold": lambda threshold: ThresholdPolicy(threshold),
    "edge-only": lambda threshold: EdgeOnlyPolicy(),
    "cloud-only": lambda threshold: CloudOnlyPolicy(),
}


def make_policy(name: str, threshold: float = 0.8) -> Policy:
    """Build the policy registered as ``name``; PolicyError names the valid choices."""
    factory = POLICIES.get(name)
    if factory is None:
        raise PolicyError(f"unknown escalation policy {name!r}; choose one of: {', '.join(POLICIES)}")
    validate_threshold(threshold)
    return factory(threshold)
