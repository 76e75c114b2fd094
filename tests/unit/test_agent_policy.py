"""Escalation policies as pure functions: threshold boundaries, fixed modes, invalid settings."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edge_agent.policy import (
    POLICIES,
    CloudOnlyPolicy,
    EdgeOnlyPolicy,
    PolicyError,
    ThresholdPolicy,
    make_policy,
    max_confidence,
)


def probs(top: float) -> np.ndarray:
    return np.array([1.0 - top, top], dtype=np.float32)


@pytest.mark.parametrize(
    ("threshold", "confidence", "escalate"),
    [
        (0.8, 0.79, True),
        (0.8, 0.8, False),  # escalate iff confidence < threshold: equal stays at the edge
        (0.8, 0.81, False),
        (0.0, 0.5, False),  # 0 never escalates
        (1.0, 0.999, True),  # 1 escalates everything short of certainty
        (1.0, 1.0, False),
        (0.5, 0.5, False),
    ],
)
def test_threshold_boundaries(threshold: float, confidence: float, escalate: bool) -> None:
    p = np.array([1.0 - confidence, confidence], dtype=np.float64)
    assert ThresholdPolicy(threshold).should_escalate(p) is escalate


def test_threshold_uses_the_max_class_not_a_fixed_one() -> None:
    policy = ThresholdPolicy(0.9)
    assert not policy.should_escalate(np.array([0.95, 0.05]))
    assert policy.should_escalate(np.array([0.4, 0.35, 0.25]))


def test_fixed_modes_ignore_confidence() -> None:
    for top in (0.5, 0.99, 1.0):
        assert EdgeOnlyPolicy().should_escalate(probs(top)) is False
        assert CloudOnlyPolicy().should_escalate(probs(top)) is True


def test_make_policy_by_name() -> None:
    assert set(POLICIES) == {"threshold", "edge-only", "cloud-only"}
    p = make_policy("threshold", 0.6)
    assert isinstance(p, ThresholdPolicy) and p.threshold == 0.6 and p.name == "threshold"
    assert make_policy("edge-only").name == "edge-only"
    assert make_policy("cloud-only").name == "cloud-only"


@pytest.mark.parametrize("bad", [-0.01, 1.01, math.nan, math.inf, "high", None])
def test_invalid_threshold_is_refused_with_the_value(bad: object) -> None:
    with pytest.raises(PolicyError, match="threshold"):
        ThresholdPolicy(bad)  # type: ignore[arg-type]
    with pytest.raises(PolicyError, match="threshold"):
        make_policy("edge-only", bad)  # type: ignore[arg-type]


def test_unknown_policy_names_the_choices() -> None:
    with pytest.raises(PolicyError, match="'budget'.*threshold, edge-only, cloud-only"):
        make_policy("budget")


def test_max_confidence() -> None:
    assert max_confidence(np.array([[0.2, 0.7, 0.1]])) == pytest.approx(0.7)
    with pytest.raises(PolicyError, match="empty"):
        max_confidence(np.array([]))
