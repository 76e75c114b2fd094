"""The rollout controller's state machine on a real SQLite database, driven by telemetry samples and
ticks in-process (the end-to-end path with real agents is tests/integration/test_rollouts.py)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cloud_hub.db import Database
from cloud_hub.devices import DeviceService
from cloud_hub.errors import Conflict, InvalidInput
from cloud_hub.gateway import DeviceActivity, MqttGateway
from cloud_hub.inference import InferenceService
from cloud_hub.metrics import HubMetrics
from cloud_hub.registry import ArtifactStore, RegistryService, TrustedKeys
from cloud_hub.rollouts.controller import RolloutController
from cloud_hub.rollouts.health import HealthRecorder
from cloud_hub.rollouts.publisher import AssignmentPublisher
from shared.bundle import pack_bundle
from shared.messages import ModelHealth, Telemetry
from shared.rollouts import RolloutCreate
from tests.hub_fixtures import HubModels

pytest_plugins = ["tests.hub_fixtures"]

DEVICES = [f"c-{i}" for i in range(10)]
GATES = {"min_requests": 10, "min_cloud_answers": 5}


@dataclass
class Hub:
    db: Database
    devices: DeviceService
    registry: RegistryService
    health: HealthRecorder
    publisher: AssignmentPublisher

    def controller(self) -> RolloutController:
        """A controller on the hub's database (a new one is what a restarted hub has)."""
        return RolloutController(self.db, self.devices, self.registry, self.health, self.publisher, tick_s=0.1)

    def report(self, device_id: str, version: str, requests: int, answers: int, agreed: int, since: float) -> None:
        """A device's telemetry: ``requests`` cases of ``version``, ``answers`` escalated and answered by the
        cloud, ``agreed`` of them with the edge's label (all counted since ``since``)."""
        self.health.record(device_id, Telemetry(
            device_id=device_id, model_name="t-edge", model_version=version,
            current_model=ModelHealth(version=version, since=since, requests=requests, escalated=answers,
                                      cloud_answers=answers, agreed=agreed, local_p99_ms=2.0)))

    def pinned(self) -> dict[str, str | None]:
        return {d.device_id: d.assigned_version for d in self.devices.list(limit=100)[0]}


@pytest.fixture
def hub(tmp_path: Path, hub_models: HubModels) -> Iterator[Hub]:
    db = Database(f"sqlite:///{tmp_path / 'hub.db'}").open()
    registry = RegistryService(db, ArtifactStore(tmp_path / "artifacts"),
                               TrustedKeys((hub_models.public_key_path,), tmp_path / "keys"))
    registry.register_bundle(hub_models.bundle_archive)
    devices = DeviceService(db, registry, "t-edge")
    for d in DEVICES:
        devices.register(d, "north" if d < "c-5" else "south")
        devices.assignment(d)  # first contact pins version 1
    for v in ("2", "3"):
        registry.register_bundle(pack_bundle(hub_models.make_bundle(v, tmp_path / v).path))
    metrics = HubMetrics()
    # The gateway is never started: assignments it cannot publish wait for a reconnection.
    gateway = MqttGateway("mqtt://127.0.0.1:1", "t", InferenceService("cpu", 8, 8, metrics),
                          DeviceActivity(devices), metrics)
    health = HealthRecorder(db)
    hub = Hub(db, devices, registry, health, AssignmentPublisher(gateway, db))
    devices.add_assignment_listener(hub.publisher.publish)
    yield hub
    db.close()


def _feed(hub: Hub, agreed_new: int, seconds: float = 0.3) -> None:
    """Telemetry from every device for ``seconds``: old versions always agree, the new one ``agreed_new``/10."""
    start, n = time.time(), 0
    since = {d: time.time() - 1 for d in DEVICES}
    while time.time() - start < seconds:
        n += 1
        for d, v in hub.pinned().items():
            hub.report(d, v or "1", 20 * n, 10 * n, 10 * n if v in ("1", "2") else agreed_new * n, since[d])
        time.sleep(0.05)


def test_bad_version_rolls_back_the_canary_only_and_restores_exact_versions(hub: Hub) -> None:
    hub.devices.assign("c-1", "2")  # the canary's two devices start from different versions
    ctl = hub.controller()
    r = ctl.start(RolloutCreate(version="3", canary_devices=["c-0", "c-1"], window_s=0.2, gates=GATES))
    assert r.state == "running" and [w.devices for w in r.waves] == [2, 3, 5]  # 10 % is inside the canary
    assert {d for d, v in hub.pinned().items() if v == "3"} == {"c-0", "c-1"}
    assert hub.publisher.resync.is_set()  # not connected: re-published on the next connection
    _feed(hub, agreed_new=1)
    ctl.tick()
    r = ctl.get(r.id)
    assert r.state == "rolled_back" and r.failure["gates"][0]["name"] == "agreement"
    assert r.failure["gates"][0]["value"] == pytest.approx(0.1) and r.failure["gates"][0]["baseline"] == 1.0
    assert hub.pinned() == {**dict.fromkeys(DEVICES, "1"), "c-1": "2"}
    with pytest.raises(Conflict, match="cannot resume"):
        ctl.resume(r.id)


def test_waves_promote_survive_a_restart_and_refuse_overlaps(hub: Hub) -> None:
    ctl = hub.controller()
    plan = RolloutCreate(version="2", target={"regions": ["north"]}, canary_count=1,
                         waves=[{"percent": 60}, {"percent": 100}], window_s=0.2, manual_promote=True, gates=GATES)
    r = ctl.start(plan)
    with pytest.raises(Conflict, match=f"rollout {r.id} .*still active"):
        ctl.start(RolloutCreate(version="3", target={"devices": ["c-0", "c-4"]}))
    south = ctl.start(RolloutCreate(version="3", target={"regions": ["south"]}, window_s=60))  # no overlap
    assert south.state == "running"
    canary = next(d.device_id for d in r.devices if d.wave == 0)
    hub.devices.assign(canary, "1")  # behind the rollout's back (or a crash before the assignment)
    ctl.tick()
    assert hub.pinned()[canary] == "2"  # the active rollout assigns it again
    _feed(hub, agreed_new=10)
    ctl = hub.controller()  # a restarted hub: everything comes from the database
    ctl.tick()
    r = ctl.get(r.id)
    assert r.state == "awaiting_promotion" and r.waves[0].decision == "passed"
    ctl.pause(r.id)
    with pytest.raises(Conflict, match="cannot promote"):
        ctl.promote(r.id)
    ctl.resume(r.id)
    _feed(hub, agreed_new=10)
    ctl.tick()
    assert ctl.get(r.id).state == "awaiting_promotion"
    r = ctl.promote(r.id, "looks good")
    assert r.current_wave == 1 and r.counts["waiting"] == 2
    _feed(hub, agreed_new=10)
    ctl.tick()
    r = ctl.promote(ctl.get(r.id).id)
    assert r.current_wave == 2
    _feed(hub, agreed_new=10)
    ctl.tick()
    r = ctl.get(r.id)
    assert r.state == "succeeded", r.waves
    assert [d for d, v in hub.pinned().items() if v == "2"] == [d for d in DEVICES if d < "c-5"]
    ctl.rollback(south.id, "not today")
    assert ctl.get(south.id).failure["manual"] is True
    assert all(v == "1" for d, v in hub.pinned().items() if d >= "c-5")


def test_a_plan_for_another_model_or_nobody_is_refused(hub: Hub) -> None:
    ctl = hub.controller()
    with pytest.raises(InvalidInput, match="no device"):
        ctl.start(RolloutCreate(version="2", target={"regions": ["east"]}))
    with pytest.raises(InvalidInput, match="not in the rollout's target"):
        ctl.start(RolloutCreate(version="2", target={"regions": ["north"]}, canary_devices=["c-9"]))
    with pytest.raises(InvalidInput, match="rollout plan is invalid"):
        ctl.start({"version": "2", "waves": [{"percent": 20}]})
    assert ctl.list() == ([], 0)


def test_federation_handover_starts_the_plan_for_the_registered_version(hub: Hub) -> None:
    ctl = hub.controller()
    info = hub.registry.get_version("t-edge", "3")
    said = ctl.start_handover(7, info, {"canary_devices": ["c-0"], "waves": [{"percent": 100}], "window_s": 0.2})
    assert said.startswith("rollout ") and "t-edge:3" in said and "federation run 7" in said
    (r,) = [r for r in ctl.list()[0] if r.version == "3"]
    assert r.state == "running" and r.model_name == "t-edge"
    assert {d for d, v in hub.pinned().items() if v == "3"} == {"c-0"}  # the canary only, so far
    with pytest.raises(Conflict):  # the same devices cannot be handed a second version meanwhile
        ctl.start_handover(8, hub.registry.get_version("t-edge", "2"), {"canary_devices": ["c-0"]})
