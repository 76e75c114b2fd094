"""An in-process agent's escalation features on real parts (mosquitto, ORT, SQLite, HTTP stand-in hub):
redaction, the learning store and feedback, /metrics, telemetry, the circuit breaker, late answers,
rollback, and the ``edgefed agent infer`` / ``rollback`` commands."""

from __future__ import annotations

import io
import json
import queue
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from edge_agent.agent import Agent
from edge_agent.cli import agent_app
from edge_agent.config import build_settings
from edge_agent.learning_store import read_cases
from shared import topics
from shared.bundle import VerifiedBundle
from shared.codec import encode_frame
from shared.messages import Telemetry
from shared.mqtt import Message, MqttClient
from shared.processes import free_port
from tests.agent_fixtures import (
    Responder,
    ServedApp,
    SigningKeys,
    StandInHub,
    make_bundle,
    tensor_with_confidence,
    wait_until,
)

pytest_plugins = ["tests.agent_fixtures"]

pytestmark = pytest.mark.integration

DEVICE = "cam-feat"
TENSOR = {"Content-Type": "application/x-edgefed-tensor"}


class Running:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        assert agent.app is not None and agent.service is not None
        self.client = TestClient(agent.app)
        self.service = agent.service

    def infer(self, confidence: float, label: int = 1, metadata: dict | None = None) -> dict:
        headers = dict(TENSOR)
        if metadata is not None:
            headers["X-Edgefed-Metadata"] = json.dumps(metadata)
        body = encode_frame(0, {}, tensor_with_confidence(confidence, label))
        r = self.client.post("/v1/infer", content=body, headers=headers)
        assert r.status_code == 200, r.text
        return r.json()


@pytest.fixture
def run_agent(
    tmp_path: Path,
    broker,
    stand_in_hub: StandInHub,
    bundle_v1: VerifiedBundle,  # noqa: ANN001
) -> Iterator[Callable[..., Running]]:
    stand_in_hub.publish(bundle_v1)
    started: list[Agent] = []

    def start(**kw: object) -> Running:
        values: dict[str, object] = dict(
            hub_url=stand_in_hub.url,
            broker_url=broker.url,
            device_id=DEVICE,
            region="north",
            data_dir=tmp_path / "agent",
            escalation_timeout_s=2.0,
            redact_salt="test-salt",
        )
        values.update(kw)
        agent = Agent(build_settings(**values))
        started.append(agent)
        agent.start()
        return Running(agent)

    yield start
    for a in started:
        a.stop()


class Sniffer:
    """Every payload published below edgefed/v1/ on the broker, raw."""

    def __init__(self, broker_url: str) -> None:
        self.payloads: queue.Queue[Message] = queue.Queue()
        self.client = MqttClient(broker_url, f"sniffer-{free_port()}")
        self.client.subscribe(f"{topics.PREFIX}/#", self.payloads.put)

    def start(self) -> Sniffer:
        """Connect, and prove the subscription is active with a message of our own."""
        self.client.start()
        probe = f"{topics.PREFIX}/sniffer-probe/status"
        deadline = time.monotonic() + 10
        while not any(m.topic == probe for m in self.all(keep=True)):
            if time.monotonic() > deadline:
                raise TimeoutError("sniffer subscription did not become active")
            self.client.publish(probe, b"probe", qos=1)
            time.sleep(0.05)
        return self

    def all(self, keep: bool = False) -> list[Message]:
        if keep:
            return list(self.payloads.queue)
        out = []
        while not self.payloads.empty():
            out.append(self.payloads.get())
        return out


def test_personal_fields_never_reach_the_broker(run_agent, broker, responder: Responder) -> None:  # noqa: ANN001
    sniffer = Sniffer(broker.url).start()
    try:
        edge = run_agent(redact="operator:hash,serial:mask,badge:drop", telemetry_interval_s=0.1)
        personal = {"operator": "Alice Smith", "serial": "SN-123456789", "badge": "B-7731", "line": "3"}
        cloud = edge.infer(0.6, metadata=personal)
        assert cloud["source"] == "cloud"
        # The same case again while the broker is gone: it waits in the outbox, redacted too.
        broker.stop()
        wait_until(lambda: not edge.service.escalator.connected, what="disconnect")  # type: ignore[union-attr]
        queued = edge.infer(0.6, metadata=personal)
        assert queued["queued"] is True
        broker.start()
        wait_until(lambda: len(edge.service.outbox) == 0, timeout=30, what="outbox drained")  # type: ignore[arg-type]
        wait_until(lambda: len(responder.received) >= 2, timeout=30, what="both cases at the hub")
        telemetry = topics.telemetry(DEVICE)
        wait_until(lambda: any(m.topic == telemetry for m in sniffer.all(keep=True)), what="telemetry sent")
    finally:
        messages = sniffer.all()
        sniffer.client.stop()
    by_topic = {m.topic for m in messages}
    assert topics.escalate(DEVICE) in by_topic and topics.telemetry(DEVICE) in by_topic, by_topic
    for m in messages:
        for secret in (b"Alice", b"B-7731", b"SN-12345"):
            assert secret not in m.payload, (m.topic, secret)
    sent = {r.request_id: r.metadata for r in responder.received}
    expected_hash = sent[cloud["request_id"]]["operator"]
    assert expected_hash.startswith("h:")
    assert sent[cloud["request_id"]] == {"operator": expected_hash, "serial": "********6789", "line": "3"}
    assert sent[queued["request_id"]] == sent[cloud["request_id"]]
    # Nothing on disk holds the raw values either.
    root = edge.agent.settings.root
    for f in [*root.glob("*.sqlite3*")]:
        assert b"Alice" not in f.read_bytes(), f


def test_bad_metadata_is_refused_with_a_4xx(run_agent) -> None:  # noqa: ANN001
    edge = run_agent()
    body = encode_frame(0, {}, tensor_with_confidence(0.6))
    for meta, detail in (("{not json", "not valid JSON"), ('["a"]', "JSON object"), ('{"a": {}}', "string")):
        r = edge.client.post("/v1/infer", content=body, headers={**TENSOR, "X-Edgefed-Metadata": meta})
        assert r.status_code == 400 and detail in r.json()["detail"], r.text
    assert edge.service.stats().requests == 0


def test_cloud_answers_and_feedback_reach_the_learning_store(run_agent, responder: Responder) -> None:  # noqa: ANN001
    edge = run_agent()
    cloud = edge.infer(0.6, label=1)
    local = edge.infer(0.95, label=1)
    assert (cloud["source"], local["source"]) == ("cloud", "edge")
    r = edge.client.post("/v1/feedback", json={"request_id": local["request_id"], "label": "ok"})
    assert r.status_code == 200 and r.json() == {"request_id": local["request_id"], "label": 0, "label_name": "ok"}
    assert edge.client.post("/v1/feedback", json={"request_id": cloud["request_id"], "label": 1}).status_code == 200
    for body, status, detail in (
        ({"request_id": "nope", "label": 0}, 404, "unknown"),
        ({"request_id": local["request_id"], "label": "scrap"}, 400, "not one of the model's labels"),
        ({"request_id": local["request_id"], "label": 7}, 400, "outside 0..1"),
        ({"label": 0}, 422, "request_id"),
    ):
        bad = edge.client.post("/v1/feedback", json=body)
        assert bad.status_code == status and detail in bad.text, bad.text
    cases = {c.request_id: c for c in read_cases(edge.agent.settings.learning_path)}
    assert set(cases) == {cloud["request_id"], local["request_id"]}
    c = cases[cloud["request_id"]]
    assert (c.cloud_label, c.confirmed_label, c.edge_label, c.cloud_model) == (0, 1, 1, "cloud:9")
    np.testing.assert_allclose(c.cloud_probabilities, [0.97, 0.03])  # the soft targets
    np.testing.assert_allclose(c.input, tensor_with_confidence(0.6, 1))
    assert (cases[local["request_id"]].confirmed_label, cases[local["request_id"]].cloud_label) == (0, None)


def test_metrics_and_telemetry(run_agent, broker, responder: Responder) -> None:  # noqa: ANN001
    received: queue.Queue[Telemetry] = queue.Queue()
    watcher = MqttClient(broker.url, "telemetry-watch")
    watcher.subscribe(topics.telemetry(DEVICE), lambda m: received.put(Telemetry.model_validate_json(m.payload)))
    watcher.start()
    try:
        edge = run_agent(telemetry_interval_s=0.2)
        edge.infer(0.6)
        edge.infer(0.95)
        text = edge.client.get("/metrics").text
        assert 'edgefed_agent_requests_total{source="cloud"} 1.0' in text
        assert 'edgefed_agent_requests_total{source="edge"} 1.0' in text
        assert 'edgefed_agent_escalations_total{outcome="answered"} 1.0' in text
        assert "edgefed_agent_breaker_state 0.0" in text and "edgefed_agent_outbox_depth 0.0" in text
        assert 'edgefed_agent_local_latency_ms{quantile="p50"}' in text
        assert 'edgefed_agent_cloud_latency_ms{quantile="p99"}' in text
        assert 'edgefed_agent_model_info{name="tiny",policy="threshold",version="1.0.0"} 1.0' in text
        while True:
            t = received.get(timeout=5)
            if t.requests == 2:
                break
        assert (t.device_id, t.region, t.model_version, t.cloud, t.edge, t.breaker) == (
            DEVICE,
            "north",
            "1.0.0",
            1,
            1,
            "closed",
        )
        assert t.local_latency_ms["p50"] is not None and t.cloud_latency_ms["p50"] is not None
    finally:
        watcher.stop()


def test_breaker_opens_answers_locally_then_probes_and_closes(run_agent, responder: Responder) -> None:  # noqa: ANN001
    responder.delay_s = 1.0  # slower than the timeout: every escalation times out
    edge = run_agent(escalation_timeout_s=0.2, breaker_failures=2, breaker_cooldown_s=1.0)
    first = [edge.infer(0.6) for _ in range(2)]
    assert [r["fallback_reason"] for r in first] == ["no answer from the hub within 0.2 s"] * 2
    assert edge.client.get("/healthz").json()["breaker"] == "open"
    assert "edgefed_agent_breaker_state 2.0" in edge.client.get("/metrics").text
    held = edge.infer(0.6)
    assert held["fallback_reason"] == "escalation circuit open (the hub was failing)" and held["queued"]
    assert held["latency_ms"] < 150  # no timeout paid while open
    responder.delay_s = 0.0  # the hub recovers
    wait_until(lambda: edge.infer(0.6)["source"] == "cloud", timeout=10, what="escalations resume")
    assert edge.client.get("/healthz").json()["breaker"] == "closed"
    stats = edge.client.get("/v1/stats").json()
    assert stats["breaker"]["opened"] >= 1 and stats["breaker"]["short_circuited"] >= 1
    # Every case that fell back was answered later, exactly once, and kept for learning.
    wait_until(lambda: len(edge.service.outbox) == 0, what="outbox drained")  # type: ignore[arg-type]
    cases = {c.request_id: c for c in read_cases(edge.agent.settings.learning_path)}
    for r in [*first, held]:
        assert cases[r["request_id"]].cloud_label == 0


def test_late_duplicated_answer_is_applied_once(run_agent, responder: Responder) -> None:  # noqa: ANN001
    responder.delay_s = 0.4
    responder.copies = 3
    edge = run_agent(escalation_timeout_s=0.1, breaker_failures=100)
    r = edge.infer(0.6)
    assert (r["source"], r["queued"]) == ("edge-fallback", True)
    wait_until(lambda: len(edge.service.outbox) == 0, what="late answer applied")  # type: ignore[arg-type]
    wait_until(lambda: edge.service.escalator.stats().late >= 3, what="all copies seen")  # type: ignore[union-attr]
    assert edge.service.stats().late_applied == 1
    (case,) = read_cases(edge.agent.settings.learning_path)
    assert (case.request_id, case.cloud_label) == (r["request_id"], 0)


def test_rollback_over_the_api_and_the_cli(
    run_agent,
    stand_in_hub: StandInHub,
    signing_keys: SigningKeys,
    tmp_path: Path,  # noqa: ANN001
) -> None:
    edge = run_agent(policy="edge-only")
    r = edge.client.post("/v1/model/rollback")
    assert r.status_code == 409 and "no previous bundle" in r.json()["detail"]
    v2 = make_bundle(tmp_path / "made" / "tiny-2.0.0", signing_keys.private, version="2.0.0", scale=-10.0)
    stand_in_hub.publish(v2)
    assert edge.agent.apply_assignment() is True
    assert edge.infer(0.95, label=1)["model_version"] == "2.0.0"
    r = edge.client.post("/v1/model/rollback")
    assert r.status_code == 200, r.text
    assert r.json() == {"model_name": "tiny", "model_version": "1.0.0", "previous_version": "2.0.0"}
    back = edge.infer(0.95, label=1)
    assert (back["model_version"], back["label"]) == ("1.0.0", 1)
    assert stand_in_hub.running[-1] == (DEVICE, "tiny", "1.0.0")
    # The hub still assigns 2.0.0; the agent does not undo the operator's rollback on its own.
    assert edge.agent.apply_assignment() is False and edge.service.runtime.version == "1.0.0"
    served = ServedApp(edge.agent.app).start()  # type: ignore[arg-type]
    try:
        out = CliRunner().invoke(agent_app, ["rollback", "--agent", served.url])
    finally:
        served.stop()
    assert out.exit_code == 0, out.output
    assert "now serving tiny:2.0.0 (was 1.0.0)" in out.output


def _png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (16, 16), color=value).save(path, format="PNG")


def test_infer_command_posts_a_folder_and_summarises(run_agent, responder: Responder, tmp_path: Path) -> None:  # noqa: ANN001
    edge = run_agent()
    images = tmp_path / "images"
    _png(images / "a.png", 255)  # confident defect
    _png(images / "sub" / "b.png", 255)
    _png(images / "sub" / "deeper" / "c.png", 128)  # unsure: escalated, the cloud says ok
    buf = io.BytesIO()
    Image.new("L", (16, 16), color=0).save(buf, format="JPEG")
    (images / "d.jpg").write_bytes(buf.getvalue())  # confident ok
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (images / "notes.txt").write_text("ignored")
    out_file = tmp_path / "results.jsonl"
    served = ServedApp(edge.agent.app).start()  # type: ignore[arg-type]
    try:
        result = CliRunner().invoke(agent_app, ["infer", str(images), "--agent", served.url, "--out", str(out_file)])
    finally:
        served.stop()
    assert result.exit_code == 1, result.output  # one image refused
    assert "4 of 5 images answered, 1 refused" in result.output
    assert "by label:  defect=2, ok=2" in result.output
    assert "by source: cloud=1, edge=3" in result.output
    lines = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert len(lines) == 5
    broken = next(rec for rec in lines if rec["path"].endswith("broken.png"))
    assert broken["status"] == 400 and "not a readable PNG or JPEG" in broken["error"]
    missing = CliRunner().invoke(agent_app, ["infer", str(tmp_path / "nothing-here")])
    assert missing.exit_code == 2 and "neither a file nor a folder" in missing.output
