"""The edge->cloud loop end to end on real parts: mosquitto, `edgefed hub serve`, `edgefed agent run`.

The agent gets its bundle from the hub, answers confident cases itself, escalates unsure ones over
MQTT to the hub's full model, refuses a bundle signed by an untrusted key, and falls back to its own
answer when the hub is gone.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from shared import messages, topics
from shared.bundle import generate_keypair, pack_bundle, unpack_bundle
from shared.codec import encode_frame
from shared.messages import EscalationRequest
from shared.mqtt import Message, MqttClient
from shared.rollouts import assign_now
from tests.agent_fixtures import AgentProcess
from tests.hub_fixtures import INPUT_SHAPE, HubModels, HubProcess, build_edge_bundle, start_hub_with_models

pytest_plugins = ["tests.hub_fixtures"]

TENSOR_TYPE = {"Content-Type": "application/x-edgefed-tensor"}


@dataclass
class Loop:
    hub: HubProcess
    agent: AgentProcess
    device_id: str
    confident: np.ndarray
    unsure: np.ndarray
    threshold: float


def _confidences(model_path: Path, xs: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {sess.get_inputs()[0].name: xs})[0]
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).max(axis=1)


def _pick_cases(hub_models: HubModels) -> tuple[np.ndarray, np.ndarray, float]:
    """The most and least confident of many random inputs, and a threshold between them."""
    xs = np.random.default_rng(7).normal(0, 3, size=(256, *INPUT_SHAPE[1:])).astype(np.float32)
    conf = _confidences(hub_models.bundle_dir / "model.onnx", xs)
    hi, lo = int(conf.argmax()), int(conf.argmin())
    assert conf[hi] - conf[lo] > 0.01, "random inputs gave no spread of confidence"
    return xs[hi : hi + 1], xs[lo : lo + 1], float((conf[hi] + conf[lo]) / 2)


def _start_agent(hub: HubProcess, device_id: str, data_dir: Path, pub_key: Path, *extra: str) -> AgentProcess:
    with hub.client() as admin:
        token = admin.register_device(device_id, "r1").token
    return AgentProcess(
        hub_url=hub.base_url, broker_url=hub.broker_url, device_id=device_id, data_dir=data_dir,
        extra=["--token", token, "--trusted-key", str(pub_key), *extra],
    ).start()


@pytest.fixture(scope="module")
def loop(module_hub: HubProcess, hub_models: HubModels, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loop]:
    """One hub and one agent shared by the tests that leave both running."""
    confident, unsure, threshold = _pick_cases(hub_models)
    agent = _start_agent(module_hub, "line-1", tmp_path_factory.mktemp("loop") / "agent", hub_models.public_key_path,
                         "--threshold", f"{threshold:.6f}", "--escalation-timeout", "2.0")
    try:
        yield Loop(module_hub, agent, "line-1", confident, unsure, threshold)
    finally:
        agent.stop()


def _infer(agent: AgentProcess, x: np.ndarray) -> dict:
    r = httpx.post(f"{agent.url}/v1/infer", content=encode_frame(0, {}, x), headers=TENSOR_TYPE, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def test_agent_runs_the_bundle_it_got_from_the_hub(loop: Loop, hub_models: HubModels) -> None:
    health = httpx.get(f"{loop.agent.url}/healthz", timeout=5).json()
    assert health["model_version"] == "1"
    with loop.hub.client() as admin:
        assert admin.get_device(loop.device_id).running_version == "1"


def test_confident_case_answered_locally(loop: Loop) -> None:
    body = _infer(loop.agent, loop.confident)
    assert body["source"] == "edge" and body["escalated"] is False
    assert body["confidence"] >= loop.threshold


def test_unsure_case_answered_by_the_cloud_model(loop: Loop, hub_models: HubModels) -> None:
    body = _infer(loop.agent, loop.unsure)
    assert body["source"] == "cloud" and body["escalated"] is True, body
    assert body["edge_confidence"] < loop.threshold
    # The answer is the hub's full model's: the same label as its REST predict for the same tensor.
    with loop.hub.http() as http:
        r = http.post("/api/v1/predict", content=encode_frame(0, {"task": "t"}, loop.unsure), headers=TENSOR_TYPE)
    assert r.status_code == 200, r.text
    assert body["label"] == r.json()["labels"][0]
    assert body["cloud_model"].startswith("t-cloud")
    assert 'edgefed_hub_escalations_answered_total{task="t"}' in loop.hub.metrics_text()


def test_bundle_from_untrusted_key_refused_and_old_model_keeps_serving(
    broker, hub_models: HubModels, tmp_path: Path  # noqa: ANN001
) -> None:
    # A compromised hub that trusts a rogue key registers version 2 signed with it; the agent,
    # which trusts only the factory key, must refuse it and keep serving version 1.
    rogue = tmp_path / "rogue.pem"
    generate_keypair(rogue, rogue.with_suffix(".pub"))
    hub = HubProcess(tmp_path / "hub", broker.url, public_keys=[hub_models.public_key_path, rogue.with_suffix(".pub")],
                     default_model=hub_models.edge_name).start()
    agent = None
    try:
        with hub.client() as admin:
            admin.push_checkpoint(hub_models.checkpoint_path)
            admin.push_bundle(hub_models.bundle_archive)
        hub.wait_ready()
        agent = _start_agent(hub, "line-2", tmp_path / "agent", hub_models.public_key_path)
        onnx_path = unpack_bundle(hub_models.bundle_archive, tmp_path / "v1") / "model.onnx"
        v2 = build_edge_bundle(tmp_path / "v2", onnx_path, rogue, version="2", parent_version="1")
        with hub.client() as admin:
            admin.push_bundle(pack_bundle(v2.path))
            # Pushing moves no device; the hub assigns version 2 and publishes it retained.
            assign_now(admin, "2", ["line-2"])
        deadline = time.monotonic() + 20
        while "does not verify" not in agent.log() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "does not verify against any trusted key" in agent.log()
        health = httpx.get(f"{agent.url}/healthz", timeout=5).json()
        assert health["model_version"] == "1"
        x = np.zeros(INPUT_SHAPE, np.float32)
        assert _infer(agent, x)["model_version"] == "1"
    finally:
        if agent is not None:
            agent.stop()
        hub.stop()


def test_hub_down_gives_the_local_answer_within_the_timeout(
    broker, hub_models: HubModels, tmp_path: Path  # noqa: ANN001
) -> None:
    confident, unsure, threshold = _pick_cases(hub_models)
    hub = start_hub_with_models(tmp_path / "hub", broker.url, hub_models)
    timeout = 0.5
    agent = _start_agent(hub, "line-3", tmp_path / "agent", hub_models.public_key_path,
                         "--threshold", f"{threshold:.6f}", "--escalation-timeout", str(timeout))
    try:
        hub.stop()
        t0 = time.perf_counter()
        body = _infer(agent, unsure)
        elapsed = time.perf_counter() - t0
        assert body["source"] == "edge-fallback", body
        assert body["label"] == body["edge_label"]
        assert elapsed < timeout + 1.0, f"fallback took {elapsed:.2f} s for a {timeout} s timeout"
        assert _infer(agent, confident)["source"] == "edge"
    finally:
        agent.stop()
        hub.stop()


def test_malformed_escalation_gets_an_error_answer_and_the_hub_keeps_serving(loop: Loop) -> None:
    answers: queue.Queue[Message] = queue.Queue()
    probe = MqttClient(loop.hub.broker_url, "probe-dev")
    probe.subscribe(topics.answer("probe-dev"), answers.put)
    probe.start()
    try:
        time.sleep(0.3)
        probe.publish(topics.escalate("probe-dev"), b"\x00garbage", response_topic=topics.answer("probe-dev"),
                      correlation_data=b"bad-1")
        msg = answers.get(timeout=10)
        answer, _ = messages.decode_answer(msg.payload)
        assert msg.correlation_data == b"bad-1"
        assert answer.ok is False and answer.error_kind == "bad_payload" and answer.error
        # Still serving: a well-formed escalation right after is answered by the full model.
        req = EscalationRequest(request_id="good-1", device_id="probe-dev", task="t")
        probe.publish(topics.escalate("probe-dev"), messages.encode_request(req, loop.unsure),
                      response_topic=topics.answer("probe-dev"), correlation_data=b"good-1")
        good, probs = messages.decode_answer(answers.get(timeout=10).payload)
        assert good.ok and good.request_id == "good-1" and probs is not None
    finally:
        probe.stop()
    assert _infer(loop.agent, loop.unsure)["source"] == "cloud"
    assert 'edgefed_hub_escalation_errors_total{kind="bad_payload"} 1.0' in loop.hub.metrics_text()
