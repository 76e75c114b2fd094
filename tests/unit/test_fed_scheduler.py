"""Federation scheduling at the hub against a real SQLite file: cron times, schedules surviving a restart,
a schedule firing (with an injected clock), the gate, and runs a previous hub process left behind.

No SuperLink runs here: a fired run is submitted through Flower's real CLI to a closed port and must
be recorded as failed with that reason.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from cloud_hub.db import Database
from cloud_hub.db.federation import FederationRunRow
from cloud_hub.errors import Conflict, InvalidInput, NotFound
from cloud_hub.federation import FederationConfig, FederationScheduler, FederationService, check_cron, next_fire
from cloud_hub.federation.handover import decide_gate
from cloud_hub.registry import ArtifactStore, RegistryService, TrustedKeys
from federation.spec import FedResult
from shared.federation_api import FedRoundCreate, FedScheduleCreate
from shared.processes import free_port
from tests.fed_fixtures import make_reference
from tests.hub_fixtures import HubModels

pytest_plugins = ["tests.hub_fixtures"]

T0 = datetime(2026, 1, 5, 10, 0, 30, tzinfo=UTC)


@dataclass
class Hub:
    """The federation part of one hub process, over a database file that outlives it."""

    db: Database
    runs: FederationService
    schedules: FederationScheduler
    clock: list[datetime]

    def stop(self) -> None:
        self.runs.stop()
        self.db.close()


@pytest.fixture
def make_hub(tmp_path: Path, hub_models: HubModels) -> Iterator[object]:
    started: list[Hub] = []
    dead_superlink = f"127.0.0.1:{free_port()}"  # nothing listens: submissions fail as they would for real

    def make(*, grace_s: float = 120.0) -> Hub:
        db = Database(f"sqlite:///{tmp_path / 'hub.db'}").open()
        registry = RegistryService(db, ArtifactStore(tmp_path / "artifacts"), TrustedKeys((), tmp_path / "keys"))
        config = FederationConfig(
            superlink_address=dead_superlink,
            flwr_home=tmp_path / "flwr",
            output_root=tmp_path / "federation",
            artifacts_dir=tmp_path / "artifacts",
            signing_key=tmp_path / "keys" / "hub-signing.pem",
            poll_s=0.2,
            unreachable_grace_s=grace_s,
        )
        clock = [T0]
        runs = FederationService(db, registry, config)
        hub = Hub(db, runs, FederationScheduler(db, runs, clock=lambda: clock[0]), clock)
        started.append(hub)
        return hub

    first = make()
    RegistryService(first.db, ArtifactStore(tmp_path / "artifacts"), TrustedKeys((), tmp_path / "keys")) \
        .register_checkpoint(hub_models.checkpoint_path.read_bytes())
    first.stop()
    try:
        yield make
    finally:
        for hub in started:
            hub.stop()


@pytest.fixture
def reference(tmp_path: Path) -> Path:
    return make_reference(tmp_path / "reference.npz")


def _round(reference: Path, **kw: object) -> FedRoundCreate:
    return FedRoundCreate(model_name="t-cloud", reference_data=str(reference), rounds=1, **kw)  # type: ignore[arg-type]


def test_next_fire_times_are_computed_in_utc() -> None:
    assert next_fire("* * * * *", T0) == datetime(2026, 1, 5, 10, 1, tzinfo=UTC)
    assert next_fire("0 3 * * *", T0) == datetime(2026, 1, 6, 3, 0, tzinfo=UTC)
    assert next_fire("*/15 * * * 1-5", T0) == datetime(2026, 1, 5, 10, 15, tzinfo=UTC)  # a Monday
    # Exactly on a slot: the next one, never the same instant again.
    assert next_fire("0 * * * *", datetime(2026, 1, 5, 11, 0, tzinfo=UTC)) == datetime(2026, 1, 5, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("expr", "words"),
    [("every minute", "has 2 fields"), ("* * * *", "has 4 fields"), ("61 * * * *", "is not valid"),
     ("* * * * * *", "has 6 fields")],
)
def test_bad_cron_expressions_are_refused_naming_the_problem(expr: str, words: str) -> None:
    with pytest.raises(InvalidInput, match=words):
        check_cron(expr)
    assert check_cron("  0  3 * *   * ") == "0 3 * * *"


def test_schedule_survives_a_restart_and_fires_once_for_missed_slots(make_hub, reference: Path) -> None:
    hub = make_hub()
    created = hub.schedules.create(FedScheduleCreate(cron="* * * * *", round=_round(reference)))
    assert created.next_fire_at == datetime(2026, 1, 5, 10, 1, tzinfo=UTC)
    assert hub.schedules.tick(datetime(2026, 1, 5, 10, 0, 59, tzinfo=UTC)) == []
    hub.stop()

    again = make_hub()  # a new hub process on the same database
    assert again.schedules.get(created.id).next_fire_at == datetime(2026, 1, 5, 10, 1, tzinfo=UTC)
    late = datetime(2026, 1, 5, 10, 5, 10, tzinfo=UTC)  # the hub was down for four slots
    started = again.schedules.tick(late)
    assert len(started) == 1
    after = again.schedules.get(created.id)
    assert after.last_run_id == started[0] and after.last_fired_at == late and after.last_error == ""
    assert after.next_fire_at == datetime(2026, 1, 5, 10, 6, tzinfo=UTC)
    assert again.schedules.tick(late) == []  # nothing more is due

    run = again.runs.wait(started[0], timeout=120)
    assert run.schedule_id == created.id and run.model_name == "t-cloud" and run.parent_version == "1"
    assert run.status == "failed"
    assert f"submitting to the SuperLink at {again.runs.config.superlink_address} failed" in run.reason
    assert run.result_versions == [] and run.finished_at is not None


def test_a_firing_while_the_model_is_busy_starts_nothing_and_says_why(make_hub, reference: Path) -> None:
    hub = make_hub()
    created = hub.schedules.create(FedScheduleCreate(cron="*/5 * * * *", round=_round(reference)))
    with hub.db.session() as s:
        busy = FederationRunRow(model_name="t-cloud", kind="cloud", parent_version="1", strategy="fedavg", spec={},
                                status="running", flower_run_id="42")
        s.add(busy)
        s.flush()
        busy_id = busy.id
    assert hub.schedules.tick(datetime(2026, 1, 5, 10, 5, tzinfo=UTC)) == []
    after = hub.schedules.get(created.id)
    assert f"already has federation run {busy_id} (running" in after.last_error
    assert after.last_run_id is None and after.next_fire_at == datetime(2026, 1, 5, 10, 10, tzinfo=UTC)
    assert [r.id for r in hub.runs.list()[0]] == [busy_id]


def test_disable_enable_and_delete(make_hub, reference: Path) -> None:
    hub = make_hub()
    created = hub.schedules.create(FedScheduleCreate(cron="0 * * * *", round=_round(reference), enabled=False))
    assert created.next_fire_at is None
    assert hub.schedules.tick(datetime(2026, 1, 9, tzinfo=UTC)) == []
    hub.clock[0] = datetime(2026, 1, 5, 12, 30, tzinfo=UTC)
    enabled = hub.schedules.set_enabled(created.id, True)
    assert enabled.enabled and enabled.next_fire_at == datetime(2026, 1, 5, 13, 0, tzinfo=UTC)
    hub.schedules.delete(created.id)
    with pytest.raises(NotFound, match=f"no federation schedule {created.id}"):
        hub.schedules.get(created.id)


def test_schedule_templates_are_checked_when_created(make_hub, reference: Path) -> None:
    hub = make_hub()
    with pytest.raises(NotFound, match="no model named 'nope'"):
        hub.schedules.create(FedScheduleCreate(cron="0 * * * *", round=FedRoundCreate(model_name="nope")))
    with pytest.raises(InvalidInput, match="task 't', which has no reference set"):
        hub.schedules.create(FedScheduleCreate(cron="0 * * * *", round=FedRoundCreate(model_name="t-cloud")))
    with pytest.raises(InvalidInput, match="unknown strategy 'fedbest'"):
        hub.schedules.create(FedScheduleCreate(cron="0 * * * *", round=_round(reference, strategy="fedbest")))
    with pytest.raises(InvalidInput, match="has no parameter\\(s\\) warp"):
        hub.schedules.create(FedScheduleCreate(cron="0 * * * *", round=_round(reference, strategy_params={"warp": 1})))
    with pytest.raises(InvalidInput, match="only edge models are rolled out"):
        hub.schedules.create(
            FedScheduleCreate(cron="0 * * * *", round=_round(reference), rollout_plan={"waves": [{"percent": 100}]})
        )
    assert hub.schedules.list() == ([], 0)


def test_runs_a_stopped_hub_left_behind_are_failed_with_the_reason(make_hub) -> None:
    hub = make_hub(grace_s=0.0)
    with hub.db.session() as s:
        unsent = FederationRunRow(model_name="t-cloud", kind="cloud", parent_version="1", strategy="fedavg",
                                  spec={}, status="queued")
        s.add(unsent)
        s.flush()
        unsent_id = unsent.id
    hub.runs.start()
    run = hub.runs.wait(unsent_id, timeout=10)
    assert run.status == "failed" and "stopped before this run reached the SuperLink" in run.reason


def test_cancel_records_the_run_failed_and_refuses_runs_that_ended(make_hub) -> None:
    hub = make_hub()
    with hub.db.session() as s:
        queued = FederationRunRow(model_name="t-cloud", kind="cloud", parent_version="1", strategy="fedavg",
                                  spec={}, status="queued")
        s.add(queued)
        s.flush()
        queued_id = queued.id
    cancelled = hub.runs.cancel(queued_id)
    assert cancelled.status == "failed" and cancelled.reason == "cancelled by the admin"
    assert cancelled.stage == "cancelled" and cancelled.finished_at is not None
    with pytest.raises(Conflict, match=f"federation run {queued_id} is already failed"):
        hub.runs.cancel(queued_id)
    with pytest.raises(NotFound, match="no federation run 999"):
        hub.runs.cancel(999)


@pytest.mark.parametrize(
    ("initial", "final", "margin", "passed", "words"),
    [
        (0.70, 0.75, 0.0, True, "passed gate: accuracy 75.00% vs parent 70.00% (+5.00 pt; required +0.00 pt)"),
        (0.70, 0.72, 5.0, False, "rejected by gate: accuracy 72.00% vs parent 70.00% (+2.00 pt; required +5.00 pt)"),
        (0.70, 0.69, -2.0, True, "passed gate"),
        (0.70, float("nan"), 0.0, False, "reported no 'accuracy' for the global model"),
    ],
)
def test_gate_compares_the_global_model_with_its_parent(
    initial: float, final: float, margin: float, passed: bool, words: str
) -> None:
    result = FedResult(status="finished", global_checkpoint=None, rounds=[], regions=[],
                       initial_metrics={"accuracy": initial}, final_metrics={"accuracy": final})
    gate = decide_gate(result, "accuracy", margin)
    assert gate.passed is passed and words in gate.reason
    assert gate.as_dict()["passed"] is passed
