"""An operator's rollback outlives an agent restart: `edgefed agent run` as a real process, restarted on
the same data directory while the hub (and the retained MQTT assignment) still name the version that
was rolled back; only a new assignment moves it on."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from shared import topics
from shared.bundle import VerifiedBundle
from shared.messages import Assignment
from shared.mqtt import MqttClient
from tests.agent_fixtures import AgentProcess, SigningKeys, StandInHub, make_bundle, wait_until

pytest_plugins = ["tests.agent_fixtures"]

pytestmark = pytest.mark.integration

DEVICE = "cam-rollback"


def _version(agent: AgentProcess) -> str:
    return httpx.get(f"{agent.url}/healthz").json()["model_version"]


def _assign(broker_url: str, version: str) -> None:
    """What the hub does on assignment: the retained message, re-delivered on every connection."""
    admin = MqttClient(broker_url, f"test-admin-{version}")
    admin.start()
    try:
        payload = Assignment(model_name="tiny", version=version).model_dump_json().encode()
        admin.publish(topics.assignment(DEVICE), payload, retain=True).wait_for_publish(5)
    finally:
        admin.stop()


def test_rollback_survives_a_restart_until_a_new_assignment(
    tmp_path: Path,
    broker,  # noqa: ANN001
    stand_in_hub: StandInHub,
    signing_keys: SigningKeys,
    bundle_v1: VerifiedBundle,
) -> None:
    data_dir = tmp_path / "agent"
    state_file = data_dir / "rollback.json"

    def agent() -> AgentProcess:
        return AgentProcess(
            hub_url=stand_in_hub.url, broker_url=broker.url, device_id=DEVICE, data_dir=data_dir,
            extra=["--policy", "edge-only"],
        )

    stand_in_hub.publish(bundle_v1)
    first = agent().start()
    try:
        stand_in_hub.publish(make_bundle(tmp_path / "made" / "tiny-2.0.0", signing_keys.private, version="2.0.0"))
        _assign(broker.url, "2.0.0")
        wait_until(lambda: _version(first) == "2.0.0", what="update to 2.0.0")
        r = httpx.post(f"{first.url}/v1/model/rollback")
        assert r.status_code == 200, r.text
        assert r.json()["model_version"] == "1.0.0"
        assert json.loads(state_file.read_text()) == {
            "serving": {"name": "tiny", "version": "1.0.0"},
            "rolled_back_from": {"name": "tiny", "version": "2.0.0"},
        }
    finally:
        assert first.stop() == 0, first.log()

    # The hub's REST assignment and the retained message still say 2.0.0.
    reports = len(stand_in_hub.running)
    second = agent().start()
    try:
        assert _version(second) == "1.0.0", second.log()
        wait_until(lambda: httpx.get(f"{second.url}/healthz").json()["broker_connected"], what="broker connected")
        time.sleep(1.0)  # the retained 2.0.0 assignment has been delivered by now; it must stay ignored
        assert _version(second) == "1.0.0", second.log()
        assert stand_in_hub.running[reports:] == [(DEVICE, "tiny", "1.0.0")]
        assert "keeping the rollback to tiny:1.0.0" in second.log()
        # A further rollback goes back to the version rolled back from, as before the restart.
        r = httpx.post(f"{second.url}/v1/model/rollback")
        assert (r.status_code, r.json()["model_version"]) == (200, "2.0.0"), r.text
        r = httpx.post(f"{second.url}/v1/model/rollback")
        assert (r.status_code, r.json()["model_version"]) == (200, "1.0.0"), r.text
        # A new assignment is followed, and the rollback is forgotten.
        stand_in_hub.publish(make_bundle(tmp_path / "made" / "tiny-3.0.0", signing_keys.private, version="3.0.0"))
        _assign(broker.url, "3.0.0")
        wait_until(lambda: _version(second) == "3.0.0", what="update to 3.0.0")
        assert not state_file.exists()
    finally:
        assert second.stop() == 0, second.log()
    assert "Traceback" not in second.log(), second.log()


def test_new_assignment_made_while_the_agent_was_down_wins_over_the_rollback(
    tmp_path: Path,
    broker,  # noqa: ANN001
    stand_in_hub: StandInHub,
    signing_keys: SigningKeys,
    bundle_v1: VerifiedBundle,
) -> None:
    data_dir = tmp_path / "agent"
    stand_in_hub.publish(bundle_v1)
    first = AgentProcess(hub_url=stand_in_hub.url, broker_url=broker.url, device_id=DEVICE, data_dir=data_dir).start()
    try:
        stand_in_hub.publish(make_bundle(tmp_path / "made" / "tiny-2.0.0", signing_keys.private, version="2.0.0"))
        _assign(broker.url, "2.0.0")
        wait_until(lambda: _version(first) == "2.0.0", what="update to 2.0.0")
        assert httpx.post(f"{first.url}/v1/model/rollback").status_code == 200
    finally:
        assert first.stop() == 0, first.log()
    assert (data_dir / "rollback.json").is_file()
    stand_in_hub.publish(make_bundle(tmp_path / "made" / "tiny-3.0.0", signing_keys.private, version="3.0.0"))
    second = AgentProcess(hub_url=stand_in_hub.url, broker_url=broker.url, device_id=DEVICE, data_dir=data_dir).start()
    try:
        assert _version(second) == "3.0.0", second.log()
        assert not (data_dir / "rollback.json").exists()
    finally:
        assert second.stop() == 0, second.log()
