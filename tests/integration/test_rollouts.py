"""Rollouts end to end on real parts: mosquitto, `edgefed hub serve`, four `edgefed agent run` processes
with live traffic escalated to the hub's cloud model.

A good version goes canary -> waves -> 100 %; a bad one (its output labels swapped, so the edge
disagrees with the cloud) fails its canary gates and is rolled back before any device outside the
canary hears of it, each canary device returning to its own previous version; a hub restart in the
middle of a wave carries on; an offline device counts as pending and catches up when it returns.
The tests share one fleet and run in file order; each states the versions it starts from.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper
from typer.testing import CliRunner, Result

from shared import topics
from shared.broker import DevBroker
from shared.bundle import pack_bundle
from shared.cli import app
from shared.codec import encode_frame
from shared.hub_client import HubClient, HubError
from shared.messages import Assignment
from shared.mqtt import Message, MqttClient
from shared.rollouts import RolloutCreate, RolloutPublic, wait_for_rollout
from tests.agent_fixtures import AgentProcess, wait_until
from tests.hub_fixtures import INPUT_SHAPE, HubModels, HubProcess, build_edge_bundle

pytest_plugins = ["tests.hub_fixtures"]

DEVICES = ["ro-1", "ro-2", "ro-3", "ro-4"]
TENSOR = {"Content-Type": "application/x-edgefed-tensor"}
# Small windows and counts so a wave is judged in about a second; latency is not what these tests
# probe (two shared cores make p99 noisy), so its slack is wide.
GATES = {"min_requests": 8, "min_cloud_answers": 5, "p99_latency_slack_ms": 200.0, "load_grace_s": 3.0}


def permuted_onnx(src: Path, dst: Path, order: tuple[int, ...] = (1, 0)) -> Path:
    """The same network with its output logits taken in ``order``: (1, 0) swaps the two labels, so
    every label it gives is the other one; (1, 0, 0) gives three classes, which no agent will load
    for a bundle that lists two labels."""
    model = onnx.load(str(src))
    out = model.graph.output[0].name
    for node in model.graph.node:
        node.output[:] = [f"{o}_raw" if o == out else o for o in node.output]
    model.graph.initializer.append(numpy_helper.from_array(np.array(order, dtype=np.int64), "swap_idx"))
    if len(order) != 2:
        dims = model.graph.output[0].type.tensor_type.shape.dim
        dims[1].dim_value = len(order)
    model.graph.node.append(helper.make_node("Gather", [f"{out}_raw", "swap_idx"], [out], axis=1))
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return dst


@dataclass
class Recorder:
    """Every assignment of this module's devices, as (device, version), in arrival order (the session broker
    also holds other tests' retained assignments)."""

    broker_url: str
    seen: list[tuple[str, str]] = field(default_factory=list)
    client: MqttClient | None = None

    def start(self) -> Recorder:
        self.client = MqttClient(self.broker_url, "rollout-test-recorder")
        self.client.subscribe(f"{topics.PREFIX}/+/assignment", self._on)
        self.client.start()
        return self

    def _on(self, msg: Message) -> None:
        device = topics.device_from_topic(msg.topic)
        if msg.payload and device in DEVICES:
            self.seen.append((device, Assignment.model_validate_json(msg.payload).version))

    def got(self, device_id: str, version: str) -> bool:
        return (device_id, version) in self.seen


class Traffic:
    """One thread per live agent sends it the chosen cases, ~10 a second, until removed or stopped."""

    def __init__(self, cases: np.ndarray) -> None:
        self.cases = cases
        self.paused = threading.Event()
        self._stops: dict[str, threading.Event] = {}

    def add(self, device_id: str, url: str) -> None:
        stop = self._stops[device_id] = threading.Event()
        threading.Thread(target=self._run, args=(url, stop), daemon=True).start()

    def remove(self, device_id: str) -> None:
        self._stops.pop(device_id).set()

    def stop(self) -> None:
        for device_id in list(self._stops):
            self.remove(device_id)

    def _run(self, url: str, stop: threading.Event) -> None:
        i = 0
        with httpx.Client(timeout=5) as http:
            while not stop.wait(0.1):
                if self.paused.is_set():
                    continue
                x = self.cases[i % len(self.cases) : i % len(self.cases) + 1]
                i += 1
                try:
                    http.post(f"{url}/v1/infer", content=encode_frame(0, {}, x), headers=TENSOR)
                except httpx.HTTPError:
                    pass  # the agent is stopping; its thread is told to stop too


@dataclass
class Fleet:
    hub: HubProcess
    agents: dict[str, AgentProcess]
    tokens: dict[str, str]
    recorder: Recorder
    traffic: Traffic
    models: HubModels
    root: Path

    def admin(self) -> HubClient:
        return self.hub.client()

    def start_agent(self, device_id: str) -> AgentProcess:
        agent = AgentProcess(
            hub_url=self.hub.base_url, broker_url=self.hub.broker_url, device_id=device_id,
            data_dir=self.root / device_id,
            extra=["--token", self.tokens[device_id], "--trusted-key", str(self.models.public_key_path),
                   "--policy", "cloud-only", "--telemetry-interval", "0.3", "--escalation-timeout", "2"],
        ).start()
        self.agents[device_id] = agent
        self.traffic.add(device_id, agent.url)
        return agent

    def stop_agent(self, device_id: str) -> None:
        self.traffic.remove(device_id)
        self.agents.pop(device_id).stop()

    def running(self) -> dict[str, str | None]:
        """What each device runs, as the hub knows it."""
        with self.admin() as admin:
            return {d.device_id: d.running_version for d in admin.list_devices().data}

    def served(self, device_id: str) -> str:
        """What the agent itself says it serves."""
        return httpx.get(f"{self.agents[device_id].url}/healthz", timeout=5).json()["model_version"]

    def rollout(self, timeout: float = 40.0, **plan: object) -> RolloutPublic:
        """Start a plan and wait for it to finish."""
        plan.setdefault("gates", GATES)
        with self.admin() as admin:
            r = admin.start_rollout(RolloutCreate.model_validate(plan))
            return wait_for_rollout(admin, r.id, timeout_s=timeout, poll_s=0.2)


def _agreeing_cases(models: HubModels, hub: HubProcess) -> np.ndarray:
    """Random inputs on which the edge model (v1) gives the cloud model's label."""
    xs = np.random.default_rng(3).normal(0, 0.1, size=(64, *INPUT_SHAPE[1:])).astype(np.float32)
    sess = ort.InferenceSession(str(models.onnx_path), providers=["CPUExecutionProvider"])
    edge = sess.run(None, {sess.get_inputs()[0].name: xs})[0].argmax(axis=1)
    with hub.http() as http:
        r = http.post("/api/v1/predict", content=encode_frame(0, {"task": models.task}, xs), headers=TENSOR)
    assert r.status_code == 200, r.text
    cloud = np.array(r.json()["labels"])
    agree = xs[edge == cloud][:16]
    assert len(agree) >= 4, "the tiny edge and cloud models agree on too few random inputs"
    return agree


@pytest.fixture(scope="module")
def fleet(
    session_broker: DevBroker, hub_models: HubModels, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("rollouts")
    hub = HubProcess(root / "hub", session_broker.url, public_keys=[hub_models.public_key_path],
                     default_model=hub_models.edge_name,
                     extra_args=["--rollout-tick", "0.2", "--warmup-batches", "0"]).start()
    recorder = Recorder(session_broker.url).start()
    traffic: Traffic | None = None
    agents: dict[str, AgentProcess] = {}
    try:
        with hub.client() as admin:
            admin.push_checkpoint(hub_models.checkpoint_path)
            admin.push_bundle(hub_models.bundle_archive)  # t-edge:1
            tokens = {d: admin.register_device(d, "r1").token for d in DEVICES}
        hub.wait_ready()
        traffic = Traffic(_agreeing_cases(hub_models, hub))
        fl = Fleet(hub, agents, tokens, recorder, traffic, hub_models, root)
        starters = [threading.Thread(target=fl.start_agent, args=(d,)) for d in DEVICES]
        for t in starters:
            t.start()
        for t in starters:
            t.join()
        assert set(agents) == set(DEVICES), "an agent did not start; see its log"
        # Versions pushed after the fleet is pinned to 1: pushing moves nobody.
        with hub.client() as admin:
            for v in ("2", "4", "5"):
                admin.push_bundle(pack_bundle(hub_models.make_bundle(v, root / f"bundle-{v}").path))
            bad = permuted_onnx(hub_models.onnx_path, root / "permuted.onnx")
            admin.push_bundle(pack_bundle(build_edge_bundle(root / "bundle-3", bad, hub_models.private_key_path,
                                                            version="3").path))
            broken = permuted_onnx(hub_models.onnx_path, root / "three-classes.onnx", (1, 0, 0))
            admin.push_bundle(pack_bundle(build_edge_bundle(root / "bundle-6", broken, hub_models.private_key_path,
                                                            version="6").path))
        yield fl
    finally:
        if traffic is not None:
            traffic.stop()
        stoppers = [threading.Thread(target=a.stop) for a in agents.values()]
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join()
        recorder.client.stop() if recorder.client else None
        hub.stop()


def test_pushing_a_version_moves_no_device(fleet: Fleet) -> None:
    time.sleep(0.5)
    assert fleet.running() == dict.fromkeys(DEVICES, "1")
    assert all(fleet.served(d) == "1" for d in DEVICES)
    with fleet.admin() as admin:
        assert {admin.get_device(d).assigned_version for d in DEVICES} == {"1"}
    assert {v for _, v in fleet.recorder.seen} == {"1"}


def test_good_version_goes_canary_then_waves_to_every_device(fleet: Fleet) -> None:
    r = fleet.rollout(version="2", canary_devices=["ro-1"], waves=[{"percent": 50}, {"percent": 100}],
                      window_s=1.0)
    assert r.state == "succeeded", r.failure
    assert [w.decision for w in r.waves] == ["passed", "passed", "passed"]
    assert [w.devices for w in r.waves] == [1, 1, 2]
    canary = r.waves[0]
    gates = {g.name: g for g in canary.gates}
    assert gates["agreement"].passed and gates["agreement"].value == 1.0, canary.gates
    assert gates["agreement"].baseline == 1.0  # measured on the devices still on version 1
    assert gates["load_failures"].passed and gates["error_rate"].value == 0.0
    wait_until(lambda: fleet.running() == dict.fromkeys(DEVICES, "2"), 15, "every device running 2")
    assert all(fleet.served(d) == "2" for d in DEVICES)
    # The canary heard of version 2 before anyone else did.
    firsts = [d for d, v in fleet.recorder.seen if v == "2"]
    assert firsts[0] == "ro-1" and set(firsts) == set(DEVICES)


def test_bad_version_is_rolled_back_within_its_canary_to_each_devices_own_version(fleet: Fleet) -> None:
    # ro-2 goes back to 1 (a one-device rollout), so the canary's two devices start from different versions.
    back = fleet.rollout(version="1", target={"devices": ["ro-2"]}, window_s=0.5)
    assert back.state == "succeeded", back.failure
    wait_until(lambda: fleet.running()["ro-2"] == "1", 15, "ro-2 running 1")
    before = fleet.running()
    assert before == {"ro-1": "2", "ro-2": "1", "ro-3": "2", "ro-4": "2"}

    r = fleet.rollout(version="3", canary_devices=["ro-1", "ro-2"], waves=[{"percent": 100}], window_s=1.5)
    assert r.state == "rolled_back"
    assert r.failure is not None and r.failure["wave"] == 0 and not r.failure["manual"]
    failed = {g["name"]: g for g in r.failure["gates"]}
    assert "agreement" in failed, r.failure
    assert failed["agreement"]["value"] < 0.2 <= failed["agreement"]["limit"]
    assert failed["agreement"]["baseline"] == 1.0
    assert "agreement" in r.failure["summary"] and r.waves[0].decision == "failed"
    assert [d.wave for d in r.devices if d.device_id in ("ro-3", "ro-4")] == [None, None]
    wait_until(lambda: fleet.running() == before, 15, "every device back on its own previous version")
    assert fleet.served("ro-1") == "2" and fleet.served("ro-2") == "1"
    # Nobody outside the canary group ever received version 3.
    assert {d for d, v in fleet.recorder.seen if v == "3"} == {"ro-1", "ro-2"}
    # The controller records "restored" on its next tick after a device reports its old version again.
    expected = {"ro-1": "restored", "ro-2": "restored", "ro-3": "waiting", "ro-4": "waiting"}
    with fleet.admin() as admin:

        def statuses() -> dict[str, str]:
            return {d.device_id: d.status for d in admin.get_rollout(r.id).devices}

        wait_until(lambda: statuses() == expected, 15, "the rollout records both canary devices as restored")
        assert statuses() == expected


def _cli(fleet: Fleet, *args: str) -> Result:
    """``edgefed rollout ...`` in this process (the same typer app the entry point runs)."""
    return CliRunner().invoke(app, ["rollout", *args, "--hub", fleet.hub.base_url, "--token", fleet.hub.admin_token])


def test_hub_restart_mid_wave_continues_the_rollout(fleet: Fleet) -> None:
    with fleet.admin() as admin:
        r = admin.start_rollout(RolloutCreate.model_validate(dict(
            version="4", canary_devices=["ro-3"], waves=[{"percent": 100}], window_s=2.0, manual_promote=True,
            gates=GATES)))
    started = r.waves[0].started_at
    assert r.state == "running" and started is not None
    fleet.traffic.paused.set()  # two cores: the hub boots faster without the escalation load
    try:
        fleet.hub.restart()
        fleet.hub.wait_ready()
    finally:
        fleet.traffic.paused.clear()
    with fleet.admin() as admin:
        after = wait_for_rollout(admin, r.id, timeout_s=30, poll_s=0.2, until=("awaiting_promotion", "rolled_back"))
    assert after.state == "awaiting_promotion", after.failure
    assert after.current_wave == 0 and after.waves[0].started_at == started  # the same wave, not restarted
    assert after.waves[0].decision == "passed" and after.waves[1].decision == "waiting"
    assert {d.device_id for d in after.devices if d.wave is not None} == {"ro-3"}

    status = _cli(fleet, "status", str(r.id))
    assert status.exit_code == 0, status.output
    assert "canary" in status.stdout and "agreement" in status.stdout and "awaiting_promotion" in status.stdout
    promote = _cli(fleet, "promote", str(r.id), "--reason", "canary looks fine")
    assert promote.exit_code == 0, promote.output
    with fleet.admin() as admin:
        done = wait_for_rollout(admin, r.id, timeout_s=30, poll_s=0.2)
    assert done.state == "succeeded", done.failure
    wait_until(lambda: set(fleet.running().values()) == {"4"}, 15, "every device running 4")


def test_offline_device_is_pending_then_catches_up(fleet: Fleet) -> None:
    fleet.stop_agent("ro-4")
    wait_until(lambda: not _device(fleet, "ro-4").online, 10, "ro-4 seen offline")
    with fleet.admin() as admin:
        r = admin.start_rollout(RolloutCreate.model_validate(dict(
            version="5", target={"devices": ["ro-4", "ro-3"]}, canary_devices=["ro-4"], waves=[{"percent": 100}],
            window_s=0.5, gates=GATES)))
        time.sleep(1.5)  # three windows: without data from ro-4 the canary cannot pass
        r = admin.get_rollout(r.id)
        assert r.state == "running" and r.current_wave == 0 and r.waves[0].decision == "observing"
        assert {d.device_id: d.status for d in r.devices} == {"ro-4": "pending", "ro-3": "waiting"}
        assert r.counts["pending"] == 1 and r.counts["running"] == 0
        with pytest.raises(HubError, match=f"rollout {r.id} .* still active") as info:
            admin.start_rollout(RolloutCreate(version="2", target={"devices": ["ro-3"]}))
        assert info.value.status == 409
    assert _retained_assignment(fleet, "ro-4") == "5"  # waiting on the broker for ro-4
    fleet.start_agent("ro-4")
    with fleet.admin() as admin:
        done = wait_for_rollout(admin, r.id, timeout_s=30, poll_s=0.2)
    assert done.state == "succeeded", done.failure
    assert fleet.served("ro-4") == "5"
    wait_until(lambda: fleet.running()["ro-3"] == "5", 15, "ro-3 running 5")


def test_bundle_the_canary_cannot_load_is_rolled_back_without_waiting_for_the_window(fleet: Fleet) -> None:
    before = fleet.running()["ro-1"]
    t0 = time.monotonic()
    r = fleet.rollout(version="6", target={"devices": ["ro-1", "ro-2"]}, canary_devices=["ro-1"],
                      waves=[{"percent": 100}], window_s=60.0)
    assert r.state == "rolled_back" and time.monotonic() - t0 < 30  # long before the 60 s window ends
    assert [g["name"] for g in r.failure["gates"]] == ["load_failures"]
    assert "ro-1" in r.failure["gates"][0]["detail"] and r.failure["gates"][0]["value"] == 1
    assert fleet.served("ro-1") == before and not fleet.recorder.got("ro-2", "6")


def test_bad_plans_are_refused_and_change_nothing(fleet: Fleet) -> None:
    with fleet.hub.http() as http:
        before = http.get("/api/v1/rollouts").json()["count"]
        cases = [
            ({"version": "2", "waves": [{"percent": 50}]}, 422, "100 %"),
            ({"version": "2", "waves": [{"percent": 50}, {"percent": 20}, {"percent": 100}]}, 422, "increase"),
            ({"version": "2", "canary_count": 1, "canary_percent": 10}, 422, "canary"),
            ({"version": "99"}, 404, "no version '99'"),
            ({"version": "2", "target": {"devices": ["nope"]}}, 404, "nope"),
            ({"version": "2", "target": {"regions": ["mars"]}}, 400, "no device"),
        ]
        for body, code, words in cases:
            r = http.post("/api/v1/rollouts", json=body)
            assert r.status_code == code, (body, r.text)
            assert words in r.text, (body, r.text)
        assert http.post("/api/v1/rollouts/9999/pause").status_code == 404
        assert http.get("/api/v1/rollouts").json()["count"] == before
        assert httpx.post(f"{fleet.hub.base_url}/api/v1/rollouts", json={"version": "2"}).status_code == 401


def _device(fleet: Fleet, device_id: str):  # noqa: ANN202
    with fleet.admin() as admin:
        return admin.get_device(device_id)


def _retained_assignment(fleet: Fleet, device_id: str) -> str | None:
    got: list[str] = []
    probe = MqttClient(fleet.hub.broker_url, f"rollout-test-probe-{device_id}")
    probe.subscribe(topics.assignment(device_id),
                    lambda m: got.append(Assignment.model_validate_json(m.payload).version))
    probe.start()
    try:
        wait_until(lambda: bool(got), 5, "the retained assignment")
    finally:
        probe.stop()
    return got[-1]
