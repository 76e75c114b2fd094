"""Rollout gates (pure) and windowed device health from telemetry samples (real SQLite)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from cloud_hub.db.models import DeviceRow, utcnow
from cloud_hub.db.rollouts import DeviceHealthRow
from cloud_hub.db.session import Database
from cloud_hub.rollouts.gates import Aggregate, evaluate, failed_summary
from cloud_hub.rollouts.health import HealthRecorder
from shared.messages import ModelHealth, Telemetry
from shared.rollouts import GateThresholds, RolloutCreate


def _agg(requests: int = 100, errors: int = 0, escalated: int = 10, answers: int = 10, agreed: int = 9,
         p99: float | None = 5.0) -> Aggregate:
    a = Aggregate(devices=1)
    a.add(requests=requests, errors=errors, escalated=escalated, cloud_answers=answers, agreed=agreed, p99_ms=p99)
    return a


def test_a_healthy_candidate_passes_every_gate() -> None:
    verdict, gates = evaluate(GateThresholds(), _agg(), _agg(), [])
    assert verdict is True and all(g.passed for g in gates)
    assert [g.name for g in gates] == ["load_failures", "error_rate", "escalation_rate", "agreement", "p99_latency_ms"]


@pytest.mark.parametrize(
    ("cand", "failed"),
    [
        (_agg(agreed=2), "agreement"),
        (_agg(errors=5), "error_rate"),
        (_agg(escalated=40), "escalation_rate"),
        (_agg(p99=50.0), "p99_latency_ms"),
    ],
)
def test_each_gate_fails_on_its_own_signal(cand: Aggregate, failed: str) -> None:
    verdict, gates = evaluate(GateThresholds(), cand, _agg(), [])
    assert verdict is False
    assert [g.name for g in gates if g.passed is False] == [failed]
    bad = next(g for g in gates if g.name == failed)
    assert bad.value is not None and bad.limit is not None and bad.baseline is not None
    assert failed in failed_summary(gates)


def test_too_few_cases_is_undecided_but_load_failures_fail_at_once() -> None:
    th = GateThresholds(min_requests=50)
    verdict, gates = evaluate(th, _agg(requests=10), _agg(), [])
    assert verdict is None and gates[0].passed is True and all(g.passed is None for g in gates[1:])
    verdict, gates = evaluate(th, _agg(requests=10), _agg(), ["cam-2"])
    assert verdict is False and gates[0].value == 1 and "cam-2" in gates[0].detail


def test_no_verdict_without_enough_cloud_answers() -> None:
    verdict, gates = evaluate(GateThresholds(min_cloud_answers=5), _agg(answers=2, agreed=2), _agg(), [])
    assert verdict is None and next(g for g in gates if g.name == "agreement").passed is None


def test_without_a_baseline_only_absolute_limits_apply() -> None:
    th = GateThresholds(min_agreement=0.8, max_p99_latency_ms=10.0)
    verdict, gates = evaluate(th, _agg(agreed=9, p99=8.0), None, [])
    by = {g.name: g for g in gates}
    assert verdict is True and by["escalation_rate"].passed is None
    assert by["agreement"].limit == 0.8 and by["p99_latency_ms"].limit == 10.0
    assert evaluate(th, _agg(agreed=5), None, [])[0] is False


def test_plans_are_validated() -> None:
    with pytest.raises(ValueError, match="must reach 100"):
        RolloutCreate(version="2", waves=[{"percent": 50}])
    with pytest.raises(ValueError, match="increase strictly"):
        RolloutCreate(version="2", waves=[{"percent": 50}, {"percent": 50}, {"percent": 100}])
    with pytest.raises(ValueError, match="canary"):
        RolloutCreate(version="2", canary_count=2, canary_devices=["a"])
    with pytest.raises(ValueError, match="not both"):
        RolloutCreate(version="2", target={"regions": ["r"], "devices": ["d"]})
    assert [w.percent for w in RolloutCreate(version="2").waves] == [10, 50, 100]


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    d = Database(f"sqlite:///{tmp_path / 'hub.db'}").open()
    with d.session() as s:
        for dev in ("d1", "d2"):
            s.add(DeviceRow(device_id=dev, region="r", model_name="m", online=True, escalations=0))
    yield d
    d.close()


def _tel(device: str, version: str, since: float, requests: int, answers: int, agreed: int,
         error: str = "") -> Telemetry:
    return Telemetry(device_id=device, model_name="m", model_version=version, update_error=error,
                     current_model=ModelHealth(version=version, since=since, requests=requests, escalated=answers,
                                               cloud_answers=answers, agreed=agreed, local_p99_ms=3.0))


def test_health_window_counts_only_what_happened_inside_it(db: Database) -> None:
    health = HealthRecorder(db)
    since = time.time() - 100  # d1's version 1 has served for a while before the window
    health.record("d1", _tel("d1", "1", since, 40, 4, 4))
    health.record("ghost", _tel("ghost", "1", since, 99, 9, 9))  # not registered: dropped
    assert health.flush() == 1
    start = utcnow()
    health.record("d1", _tel("d1", "1", since, 70, 7, 6))
    health.record("d2", _tel("d2", "2", time.time(), 25, 5, 1))  # version 2 started inside the window
    health.flush()
    end = utcnow() + timedelta(seconds=1)
    old = health.aggregate(["d1", "d2"], "m", start, end, lambda v: v != "2")
    assert (old.devices, old.requests, old.cloud_answers, old.agreed) == (1, 30, 3, 2)
    new = health.aggregate(["d1", "d2"], "m", start, end, lambda v: v == "2")
    assert (new.devices, new.requests, new.cloud_answers, new.agreed, new.p99_ms) == (1, 25, 5, 1, 3.0)
    assert health.count() == 3


def test_load_errors_count_after_the_grace_period_only(db: Database) -> None:
    health = HealthRecorder(db)
    assigned = utcnow() - timedelta(seconds=10)
    health.record("d1", _tel("d1", "1", time.time(), 1, 0, 0, error="cannot serve m:2: bad model"))
    health.record("d2", _tel("d2", "2", time.time(), 1, 0, 0))
    health.flush()
    assert health.update_errors({"d1": assigned, "d2": assigned}, "2", grace_s=5) == {
        "d1": "cannot serve m:2: bad model"}
    assert health.update_errors({"d1": utcnow()}, "2", grace_s=5) == {}
    with db.session() as s:
        s.query(DeviceHealthRow).update({DeviceHealthRow.received_at: utcnow() - timedelta(days=2)})
    assert health.prune() == 2 and health.count() == 0
