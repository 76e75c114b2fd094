"""Escalation policies as pure functions: threshold boundaries, fixed modes, invalid settings."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edge_agent.budget import BudgetPolicy, threshold_from_quantiles
from edge_agent.policy import (
    POLICIES,
    CloudOnlyPolicy,
    EdgeOnlyPolicy,
    PolicyConfig,
    PolicyError,
    ThresholdPolicy,
    make_policy,
    max_confidence,
)
from edge_agent.scores import ScoreError, confidence, entropy_score, margin
from shared.bundle.manifest import BundleMetrics


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
    assert set(POLICIES) == {"threshold", "margin", "entropy", "budget", "edge-only", "cloud-only"}
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
    with pytest.raises(PolicyError, match="'oracle'.*threshold, margin, entropy, budget, edge-only, cloud-only"):
        make_policy("oracle")


def test_max_confidence() -> None:
    assert max_confidence(np.array([[0.2, 0.7, 0.1]])) == pytest.approx(0.7)
    with pytest.raises(PolicyError, match="empty"):
        max_confidence(np.array([]))


# --- scores, margin, entropy ---------------------------------------------------------------------
def test_scores_are_certainties_in_0_1() -> None:
    p = np.array([0.5, 0.3, 0.2])
    assert confidence(p) == pytest.approx(0.5)
    assert margin(p) == pytest.approx(0.2)
    uniform, onehot = np.full(4, 0.25), np.array([0.0, 1.0, 0.0, 0.0])
    assert entropy_score(uniform) == pytest.approx(0.0, abs=1e-12)
    assert entropy_score(onehot) == pytest.approx(1.0)
    # Sedna's CrossEntropyFilter score: 1 + sum(p log p) / log K
    assert entropy_score(p) == pytest.approx(1 + float((p * np.log(p)).sum()) / math.log(3))
    with pytest.raises(ScoreError, match="NaN"):
        margin(np.array([np.nan, 0.5]))


def test_margin_and_entropy_policies_use_their_own_score() -> None:
    # Same top-1 confidence, different runner-up: only margin and entropy tell them apart.
    close, clear = np.array([0.45, 0.40, 0.15]), np.array([0.45, 0.10, 0.10, 0.10, 0.10, 0.15])
    m = make_policy("margin", 0.2)
    assert m.name == "margin" and m.should_escalate(close) and not m.should_escalate(clear)
    t = make_policy("threshold", 0.5)
    assert t.should_escalate(close) and t.should_escalate(clear)
    e = make_policy("entropy", 0.5)
    assert e.should_escalate(np.array([0.5, 0.5])) and not e.should_escalate(np.array([0.99, 0.01]))


# --- budget ---------------------------------------------------------------------------------------
def _two_class(conf: np.ndarray) -> list[np.ndarray]:
    return [np.array([1 - c, c]) for c in conf]


def test_budget_threshold_comes_from_the_manifest_quantiles() -> None:
    quantiles = list(np.linspace(0.5, 1.0, 101))  # uniform confidence on [0.5, 1]
    policy = make_policy(
        PolicyConfig(name="budget", budget_rate=0.1),
        calibration=BundleMetrics(calibration_confidence_quantiles=quantiles),
    )
    assert isinstance(policy, BudgetPolicy) and policy.source == "calibration"
    assert policy.threshold == pytest.approx(0.55)
    assert threshold_from_quantiles([0.0, 1.0], 0.25) == pytest.approx(0.25)


def test_budget_uses_the_quantiles_of_its_score_or_falls_back() -> None:
    metrics = BundleMetrics(calibration_margin_quantiles=list(np.linspace(0, 1, 101)))
    by_margin = BudgetPolicy(0.2, score="margin", calibration=metrics)
    assert (by_margin.source, by_margin.threshold) == ("calibration", pytest.approx(0.2))
    no_stats = BudgetPolicy(0.2, score="confidence", calibration=metrics, fallback_threshold=0.7)
    assert (no_stats.source, no_stats.threshold) == ("fallback", 0.7)
    broken = BundleMetrics(calibration_confidence_quantiles=[0.9, 0.5, float("nan")])
    assert BudgetPolicy(0.2, calibration=broken).source == "fallback"


@pytest.mark.parametrize("calibrated", [True, False])
def test_budget_keeps_the_live_rate_on_target_as_traffic_drifts(calibrated: bool) -> None:
    rng = np.random.default_rng(0)
    metrics = BundleMetrics(calibration_confidence_quantiles=list(np.linspace(0.5, 1.0, 101)))
    policy = BudgetPolicy(0.1, calibration=metrics if calibrated else None, window=500)
    # Phase 1 looks like the calibration split; phase 2 drifts to much less confident cases, where
    # the calibrated threshold alone would escalate about 60 %.
    phase1 = rng.uniform(0.5, 1.0, 3000)
    phase2 = rng.uniform(0.5, 0.6, 3000)
    d1 = [policy.should_escalate(p) for p in _two_class(phase1)]
    d2 = [policy.should_escalate(p) for p in _two_class(phase2)]
    assert np.mean(d1[1000:]) == pytest.approx(0.1, abs=0.02)
    assert np.mean(d2[1000:]) == pytest.approx(0.1, abs=0.02)
    assert policy.source == "live" and policy.live_rate == pytest.approx(0.1, abs=0.03)


def test_budget_recalibrates_on_a_new_model_and_splits_ties() -> None:
    policy = BudgetPolicy(0.1, window=200)
    # A saturated model: every case has confidence 1.0. No threshold separates them, so the policy
    # picks the budgeted share of the tied cases at random.
    decisions = [policy.should_escalate(np.array([0.0, 1.0])) for _ in range(1000)]
    assert np.mean(decisions[100:]) == pytest.approx(0.1, abs=0.01)
    assert policy.live_rate == pytest.approx(0.1, abs=0.01)
    policy.calibrate(BundleMetrics(calibration_confidence_quantiles=list(np.linspace(0.5, 1.0, 101))))
    assert (policy.source, policy.live_rate, policy.deficit) == ("calibration", None, 0.0)


@pytest.mark.parametrize("rate", [0.05, 0.1, 0.15, 0.2])
def test_budget_realised_rate_does_not_inherit_the_calibration_error(rate: float) -> None:
    # The calibration quantiles come from 250 cases, so they are a few points off the true quantile;
    # streams of 500 cases from the true distribution must still land within 1 pt of the target.
    errors = []
    for seed in range(10):
        rng = np.random.default_rng(seed)
        calibration = rng.beta(5, 1, 250) * 0.5 + 0.5  # skewed towards confident, like a trained model
        quantiles = [float(q) for q in np.quantile(calibration, np.linspace(0, 1, 101))]
        policy = BudgetPolicy(rate, calibration=BundleMetrics(calibration_confidence_quantiles=quantiles))
        stream = rng.beta(5, 1, 500) * 0.5 + 0.5
        errors.append(np.mean([policy.should_escalate(p) for p in _two_class(stream)]) - rate)
    assert max(abs(e) for e in errors) <= 0.01, errors


def test_budget_adaptation_is_bounded() -> None:
    metrics = BundleMetrics(calibration_confidence_quantiles=list(np.linspace(0.5, 1.0, 101)))
    # Before min_samples the calibration decides: 40 certain cases escalate none, so 4 are owed;
    # unbounded, the level would be 0.1 + 4/50 = 0.18; bounded, it stays at target + 0.05.
    sure = BudgetPolicy(0.1, calibration=metrics, max_adjust=0.05)
    assert not any(sure.should_escalate(p) for p in _two_class(np.full(40, 0.999)))
    assert sure.deficit == pytest.approx(4.0)
    sure.should_escalate(np.array([0.001, 0.999]))
    assert sure.level == pytest.approx(0.15)
    # 40 unsure cases all escalate: 36 too many; the level drops to target - 0.05, not to 0.
    unsure = BudgetPolicy(0.1, calibration=metrics, max_adjust=0.05)
    assert all(unsure.should_escalate(p) for p in _two_class(np.full(40, 0.51)))
    unsure.should_escalate(np.array([0.49, 0.51]))
    assert unsure.level == pytest.approx(0.05)
    with pytest.raises(ValueError, match="horizon"):
        BudgetPolicy(0.1, horizon=0.5)
