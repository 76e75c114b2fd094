"""Agent start/stop, trust on first use, bundle updates and refusals (stand-in hub over HTTP, real broker)."""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from edge_agent.agent import Agent, AgentStartError
from edge_agent.bundles import TrustError
from edge_agent.config import AgentSettings, build_settings
from shared import topics
from shared.bundle import MANIFEST_FILE, VerifiedBundle, pack_bundle, write_bundle
from shared.messages import Assignment, DeviceStatus
from shared.mqtt import Message, MqttClient
from shared.processes import free_port
from tests.agent_fixtures import SigningKeys, StandInHub, install_bundle, make_bundle, tensor_with_confidence

pytest_plugins = ["tests.agent_fixtures"]

pytestmark = pytest.mark.integration

DEVICE = "cam-life"


@pytest.fixture
def settings_for(tmp_path: Path, broker) -> Callable[..., AgentSettings]:  # noqa: ANN001
    def make(hub_url: str, **kw: object) -> AgentSettings:
        values: dict[str, object] = dict(
            hub_url=hub_url,
            broker_url=broker.url,
            device_id=DEVICE,
            region="r1",
            data_dir=tmp_path / "agent",
            hub_timeout_s=2.0,
        )
        values.update(kw)
        return build_settings(**values)

    return make


@pytest.fixture
def watch(broker) -> Iterator[Callable[[], StatusWatcher]]:  # noqa: ANN001
    watchers: list[StatusWatcher] = []

    def make() -> StatusWatcher:
        watchers.append(StatusWatcher(broker.url))
        return watchers[-1].start()

    yield make
    for w in watchers:
        w.client.stop()


@pytest.fixture
def agents() -> Iterator[list[Agent]]:
    started: list[Agent] = []
    yield started
    for a in started:
        a.stop()


def start(agents: list[Agent], settings: AgentSettings) -> Agent:
    agent = Agent(settings)
    agents.append(agent)
    agent.start()
    return agent


class StatusWatcher:
    """Collects DeviceStatus messages (retained ones included) for one device."""

    def __init__(self, broker_url: str) -> None:
        self.q: queue.Queue[DeviceStatus] = queue.Queue()
        self.client = MqttClient(broker_url, f"watcher-{free_port()}")
        self.client.subscribe(topics.status(DEVICE), self._on)

    def start(self) -> StatusWatcher:
        self.client.start()
        return self

    def _on(self, msg: Message) -> None:
        self.q.put(DeviceStatus.model_validate_json(msg.payload))

    def next(self, where: Callable[[DeviceStatus], bool], timeout: float = 5.0) -> DeviceStatus:
        deadline = time.monotonic() + timeout
        while True:
            status = self.q.get(timeout=max(0.01, deadline - time.monotonic()))
            if where(status):
                return status


def _tamper_model(bundle: VerifiedBundle, tmp: Path) -> bytes:
    copy = tmp / f"tampered-{bundle.manifest.version}"
    shutil.copytree(bundle.path, copy)
    data = bytearray((copy / "model.onnx").read_bytes())
    data[-10] ^= 0xFF
    (copy / "model.onnx").write_bytes(bytes(data))
    return pack_bundle(copy)


def test_start_pins_keys_downloads_reports_and_publishes_status(
    settings_for,
    agents: list[Agent],
    stand_in_hub: StandInHub,
    bundle_v1: VerifiedBundle,
    watch,  # noqa: ANN001
    caplog: pytest.LogCaptureFixture,
) -> None:
    stand_in_hub.publish(bundle_v1)
    settings = settings_for(stand_in_hub.url)
    with caplog.at_level(logging.WARNING):
        agent = start(agents, settings)
    assert "on first use" in caplog.text and str(settings.pinned_keys_path) in caplog.text
    assert settings.pinned_keys_path.read_text().strip() == stand_in_hub.keys_pem[0].strip()
    assert (settings.bundles_dir / "tiny-1.0.0" / "model.onnx").is_file()
    assert stand_in_hub.running == [(DEVICE, "tiny", "1.0.0")]
    watcher = watch()
    online = watcher.next(lambda s: True)
    assert (online.state, online.model_name, online.model_version, online.region) == (
        "online",
        "tiny",
        "1.0.0",
        "r1",
    )
    agent.stop()
    assert watcher.next(lambda s: s.state == "offline").model_version == "1.0.0"
    # The offline status is retained: a newcomer sees it too.
    assert watch().next(lambda s: True).state == "offline"


def test_refused_update_keeps_serving_the_old_model(
    settings_for,
    agents: list[Agent],
    stand_in_hub: StandInHub,
    bundle_v1: VerifiedBundle,  # noqa: ANN001
    signing_keys: SigningKeys,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    stand_in_hub.publish(bundle_v1)
    agent = start(agents, settings_for(stand_in_hub.url))
    assert agent.service is not None
    v2 = make_bundle(tmp_path / "made" / "tiny-2.0.0", signing_keys.private, version="2.0.0", scale=-10.0)
    stand_in_hub.publish(v2, archive=_tamper_model(v2, tmp_path))
    with caplog.at_level(logging.ERROR):
        assert agent.apply_assignment() is False
    assert "refusing bundle" in caplog.text and "SHA-256 of model.onnx" in caplog.text
    assert "keeping tiny:1.0.0" in caplog.text
    assert agent.service.runtime.version == "1.0.0"
    assert not (agent.settings.bundles_dir / "tiny-2.0.0").exists()
    assert stand_in_hub.running == [(DEVICE, "tiny", "1.0.0")]

    stand_in_hub.publish(v2)  # the genuine v2
    assert agent.apply_assignment() is True
    assert agent.service.runtime.version == "2.0.0"
    assert stand_in_hub.running[-1] == (DEVICE, "tiny", "2.0.0")
    # scale -10 flips the model: the same input now reads as the other label.
    assert asyncio.run(agent.service.infer(tensor_with_confidence(0.95, label=1))).label == 0


def test_assignment_message_triggers_the_update(
    settings_for,
    agents: list[Agent],
    stand_in_hub: StandInHub,
    bundle_v1: VerifiedBundle,  # noqa: ANN001
    signing_keys: SigningKeys,
    tmp_path: Path,
    broker,
    watch,  # noqa: ANN001
) -> None:
    stand_in_hub.publish(bundle_v1)
    agent = start(agents, settings_for(stand_in_hub.url))
    assert agent.service is not None
    stand_in_hub.publish(make_bundle(tmp_path / "made" / "tiny-2.0.0", signing_keys.private, version="2.0.0"))
    admin = MqttClient(broker.url, "test-admin")
    admin.start()
    try:
        admin.publish(
            topics.assignment(DEVICE),
            Assignment(model_name="tiny", version="2.0.0").model_dump_json().encode(),
            retain=True,
        ).wait_for_publish(5)
        watcher = watch()
        assert watcher.next(lambda s: s.model_version == "2.0.0").state == "online"
    finally:
        admin.stop()
    assert agent.service.runtime.version == "2.0.0"
    assert json.loads((agent.settings.bundles_dir / "current.json").read_text())["version"] == "2.0.0"


def test_tampered_assignment_at_start_falls_back_to_the_verified_bundle_on_disk(
    settings_for,
    agents: list[Agent],
    stand_in_hub: StandInHub,
    bundle_v1: VerifiedBundle,  # noqa: ANN001
    signing_keys: SigningKeys,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = settings_for(stand_in_hub.url, trusted_key=signing_keys.public_path)
    install_bundle(settings.root, bundle_v1)
    v2 = make_bundle(tmp_path / "made" / "tiny-2.0.0", signing_keys.private, version="2.0.0")
    copy = tmp_path / "edited"
    shutil.copytree(v2.path, copy)
    manifest = json.loads((copy / MANIFEST_FILE).read_text())
    manifest["labels"] = ["fine", "scrap"]
    (copy / MANIFEST_FILE).write_text(json.dumps(manifest))
    stand_in_hub.publish(v2, archive=pack_bundle(copy))
    with caplog.at_level(logging.ERROR):
        agent = start(agents, settings)
    assert "refusing the assigned bundle" in caplog.text and "signature of bundle tiny:2.0.0" in caplog.text
    assert agent.service is not None and agent.service.runtime.version == "1.0.0"
    assert agent.service.runtime.labels == ["ok", "defect"]
    assert not settings.pinned_keys_path.exists()  # --trusted-key given: nothing pinned from the hub


def test_hub_unreachable_uses_the_newest_verified_bundle_on_disk(
    settings_for,
    agents: list[Agent],
    signing_keys: SigningKeys,
    tmp_path: Path,  # noqa: ANN001
) -> None:
    dead_hub = f"http://127.0.0.1:{free_port()}"
    settings = settings_for(dead_hub, trusted_key=signing_keys.public_path)
    for version, day in (("1", "01"), ("3", "03"), ("2", "02")):
        install_bundle(
            settings.root,
            make_bundle(
                tmp_path / "made" / f"v{version}",
                signing_keys.private,
                version=version,
                created_at=f"2025-01-{day}T00:00:00+00:00",
            ),
        )
    agent = start(agents, settings)
    assert agent.service is not None and agent.service.runtime.version == "3"


def test_no_model_or_no_trust_means_no_start(settings_for, signing_keys: SigningKeys) -> None:  # noqa: ANN001
    dead_hub = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(AgentStartError, match="no model to serve"):
        Agent(settings_for(dead_hub, trusted_key=signing_keys.public_path)).start()
    with pytest.raises(TrustError, match="no --trusted-key given, no pinned keys"):
        Agent(settings_for(dead_hub)).start()


def test_broker_down_at_start_still_serves_at_the_edge(
    settings_for,
    agents: list[Agent],
    stand_in_hub: StandInHub,
    bundle_v1: VerifiedBundle,  # noqa: ANN001
) -> None:
    stand_in_hub.publish(bundle_v1)
    settings = settings_for(stand_in_hub.url, broker_url=f"mqtt://127.0.0.1:{free_port()}", broker_connect_wait_s=0.1)
    agent = start(agents, settings)
    assert agent.service is not None and agent.service.escalator is not None
    assert not agent.service.escalator.connected
    r = asyncio.run(agent.service.infer(tensor_with_confidence(0.6)))
    assert (r.source, r.fallback_reason) == ("edge-fallback", "broker not connected")


def test_swap_under_load_fails_no_request(
    settings_for,  # noqa: ANN001
    agents: list[Agent],
    stand_in_hub: StandInHub,
    bundle_v1: VerifiedBundle,
    signing_keys: SigningKeys,
    tmp_path: Path,
) -> None:
    stand_in_hub.publish(bundle_v1)
    agent = start(agents, settings_for(stand_in_hub.url, policy="edge-only"))
    service = agent.service
    assert service is not None
    stand_in_hub.publish(make_bundle(tmp_path / "made" / "tiny-2.0.0", signing_keys.private, version="2.0.0"))

    async def load() -> list[str]:
        swap = asyncio.create_task(asyncio.to_thread(agent.apply_assignment))
        results = []
        for _ in range(20):
            batch = await asyncio.gather(*(service.infer(tensor_with_confidence(0.9)) for _ in range(10)))
            results.extend(batch)
        assert await swap is True
        results.append(await service.infer(tensor_with_confidence(0.9)))
        return [r.model_version for r in results]

    versions = asyncio.run(load())
    assert len(versions) == 201 and set(versions) <= {"1.0.0", "2.0.0"} and versions[-1] == "2.0.0"


def test_running_version_is_reported_once_the_hub_is_back(
    settings_for,  # noqa: ANN001
    agents: list[Agent],
    signing_keys: SigningKeys,
    bundle_v1: VerifiedBundle,
    broker,  # noqa: ANN001
) -> None:
    late_hub = StandInHub([signing_keys.public_pem.decode()])  # not started yet: unreachable
    settings = settings_for(late_hub.url, trusted_key=signing_keys.public_path)
    install_bundle(settings.root, bundle_v1)
    agent = start(agents, settings)
    assert agent.mqtt is not None and agent.mqtt.connected
    late_hub.start()
    try:
        broker.stop()  # a reconnection is when the agent retries what the hub missed
        broker.start()
        deadline = time.monotonic() + 15
        while not late_hub.running and time.monotonic() < deadline:
            time.sleep(0.05)
        assert late_hub.running == [(DEVICE, "tiny", "1.0.0")]
    finally:
        late_hub.stop()


def test_unloadable_bundle_is_refused_and_reported_while_the_old_model_serves(
    settings_for,
    agents: list[Agent],
    stand_in_hub: StandInHub,
    bundle_v1: VerifiedBundle,  # noqa: ANN001
    signing_keys: SigningKeys,
    tmp_path: Path,
    watch,  # noqa: ANN001
    caplog: pytest.LogCaptureFixture,
) -> None:
    stand_in_hub.publish(bundle_v1)
    agent = start(agents, settings_for(stand_in_hub.url))
    assert agent.service is not None and agent.app is not None
    # Correctly signed, hash matches, but not an ONNX model: verification passes, loading fails.
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not an onnx model")
    v1m = bundle_v1.manifest
    broken = write_bundle(
        tmp_path / "made" / "tiny-3.0.0", garbage, v1m.model_copy(update={"version": "3.0.0"}), signing_keys.private
    )
    stand_in_hub.publish(broken)
    with caplog.at_level(logging.ERROR):
        assert agent.apply_assignment() is False
    assert "cannot serve tiny:3.0.0" in caplog.text and "keeping tiny:1.0.0" in caplog.text
    assert agent.service.runtime.version == "1.0.0"
    assert asyncio.run(agent.service.infer(tensor_with_confidence(0.95))).model_version == "1.0.0"
    status = watch().next(lambda s: s.last_error != "")
    assert (status.state, status.model_version) == ("online", "1.0.0")
    assert status.last_error.startswith("cannot serve tiny:3.0.0: onnxruntime cannot load")
    with TestClient(agent.app) as client:
        assert client.get("/healthz").json()["update_error"] == status.last_error
    # A good update clears the report.
    stand_in_hub.publish(make_bundle(tmp_path / "made" / "tiny-4.0.0", signing_keys.private, version="4.0.0"))
    assert agent.apply_assignment() is True
    assert watch().next(lambda s: s.model_version == "4.0.0").last_error == ""
