"""The demo's loop measurements: phases without leakage, cascade metrics, escalation rate at equal accuracy."""

from __future__ import annotations

import numpy as np
import pytest

from shared.demo import REGIONS, compare_scores, escalation_at_accuracy, phase_metrics, split_phases


def test_escalation_at_accuracy_escalates_least_confident_first() -> None:
    y = np.array([0, 0, 1, 1, 0, 1])
    edge = np.array([1, 0, 0, 1, 0, 1])  # wrong on cases 0 and 2
    conf = np.array([0.55, 0.9, 0.6, 0.95, 0.8, 0.7])  # 0 is the least confident, then 2
    cloud = y.copy()
    # Edge alone: 4/6. Escalating case 0 gives 5/6, case 2 too gives 6/6.
    assert escalation_at_accuracy(conf, edge, cloud, y, 4 / 6) == 0.0
    assert escalation_at_accuracy(conf, edge, cloud, y, 5 / 6) == pytest.approx(1 / 6)
    assert escalation_at_accuracy(conf, edge, cloud, y, 1.0) == pytest.approx(2 / 6)


def test_escalation_at_accuracy_none_when_the_cloud_cannot_reach_the_target() -> None:
    y = np.array([0, 1, 1])
    edge = np.array([1, 1, 1])
    cloud = np.array([1, 1, 1])  # the cloud is wrong on case 0 as well
    assert escalation_at_accuracy(np.array([0.5, 0.6, 0.7]), edge, cloud, y, 1.0) is None


def test_phase_metrics_and_relative_drop() -> None:
    y = np.array([0, 1, 0, 1])
    cloud = y.copy()
    old = (np.array([1, 0, 0, 1]), np.array([0.5, 0.55, 0.9, 0.9]))  # two wrong, both unsure
    new = (np.array([1, 1, 0, 1]), np.array([0.5, 0.9, 0.9, 0.9]))  # one wrong, unsure
    m = phase_metrics(old[0], old[1], cloud, y, threshold=0.6)
    assert m == {"edge_only_accuracy": 0.5, "escalation_rate": 0.5, "cascade_accuracy": 1.0}
    out = compare_scores(old, new, cloud, y, threshold=0.6)
    assert out["equal_accuracy_target"] == 1.0
    assert out["old_escalation_at_target"] == 0.5 and out["new_escalation_at_target"] == 0.25
    assert out["relative_drop"] == 0.5
    assert out["new"]["escalation_rate"] == 0.25


def test_phases_are_disjoint_and_cover_the_regions_test_cases() -> None:
    from shared.data.splits import task_split
    from shared.data.tasks import load_task

    data = load_task("elpv")
    a, b = split_phases(data, REGIONS)
    ia, ib = {i for i, _ in a}, {i for i, _ in b}
    assert not ia & ib, "a phase-B case would be streamed (and learned from) before federation"
    assert ia | ib == set(task_split(data, seed=0).test.tolist())
    for region in REGIONS:
        na, nb = sum(r == region for _, r in a), sum(r == region for _, r in b)
        assert na > 0 and abs(na - nb) <= 1
    # One region only: its cases, the same ones as in the full split.
    a1, b1 = split_phases(data, ["poly-a"])
    assert {r for _, r in a1 + b1} == {"poly-a"}
    assert set(a1) == {c for c in a if c[1] == "poly-a"}


def test_equal_confidences_are_escalated_together() -> None:
    y = np.array([0, 0, 0, 0])
    edge = np.array([1, 0, 0, 0])  # wrong on case 0, which ties with case 1
    conf = np.array([0.6, 0.6, 0.9, 0.9])
    cloud = y.copy()
    # A threshold cannot escalate case 0 without case 1: 2 of 4, not 1 of 4.
    assert escalation_at_accuracy(conf, edge, cloud, y, 1.0) == 0.5
