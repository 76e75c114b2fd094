"""`edgefed agent run` as a real process, on an environment where torch cannot be imported."""

from __future__ import annotations

import importlib.util
import os
import queue
import sys
from pathlib import Path

import httpx
import pytest

from shared import topics
from shared.bundle import VerifiedBundle
from shared.codec import encode_frame
from shared.messages import DeviceStatus
from shared.mqtt import MqttClient
from tests.agent_fixtures import AgentProcess, Responder, StandInHub, agent_command, tensor_with_confidence

pytest_plugins = ["tests.agent_fixtures"]

pytestmark = pytest.mark.integration


def _command() -> list[str]:
    # `edgefed` needs every part's CLI module; until they all exist, run the agent's own entry point.
    parts = ("cloud_hub.cli", "cloud_hub.factory.cli")
    if all(importlib.util.find_spec(p) is not None for p in parts):
        return agent_command()
    return [sys.executable, "-m", "edge_agent"]


def _no_torch_env(tmp_path: Path) -> dict[str, str]:
    blocker = tmp_path / "no-torch"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['torch'] = None  # as if not installed\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(blocker), env.get("PYTHONPATH")) if p)
    return env


def test_agent_process_serves_escalates_and_stops_cleanly(
    tmp_path: Path,
    broker,
    stand_in_hub: StandInHub,
    responder: Responder,
    bundle_v1: VerifiedBundle,  # noqa: ANN001
) -> None:
    stand_in_hub.publish(bundle_v1)
    statuses: queue.Queue[DeviceStatus] = queue.Queue()
    watcher = MqttClient(broker.url, "watcher")
    watcher.subscribe(topics.status("cam-proc"), lambda m: statuses.put(DeviceStatus.model_validate_json(m.payload)))
    watcher.start()
    agent = AgentProcess(
        hub_url=stand_in_hub.url,
        broker_url=broker.url,
        device_id="cam-proc",
        data_dir=tmp_path / "agent",
        extra=["--escalation-timeout", "2"],
        command=_command(),
        env=_no_torch_env(tmp_path),
    )
    try:
        agent.start()
        health = httpx.get(f"{agent.url}/healthz").json()
        assert (health["model_version"], health["broker_connected"]) == ("1.0.0", True)
        headers = {"Content-Type": "application/x-edgefed-tensor"}
        sure = httpx.post(
            f"{agent.url}/v1/infer",
            headers=headers,
            content=encode_frame(0, {}, tensor_with_confidence(0.95)),
        ).json()
        unsure = httpx.post(
            f"{agent.url}/v1/infer", headers=headers, content=encode_frame(0, {}, tensor_with_confidence(0.6))
        ).json()
        assert (sure["source"], unsure["source"]) == ("edge", "cloud")
        assert [r.request_id for r in responder.received] == [unsure["request_id"]]
        assert statuses.get(timeout=5).state == "online"
    finally:
        code = agent.stop()
        watcher.stop()
    assert code == 0, agent.log()
    assert "Traceback" not in agent.log(), agent.log()
    assert statuses.get(timeout=5).state == "offline"
    assert stand_in_hub.running == [("cam-proc", "tiny", "1.0.0")]
