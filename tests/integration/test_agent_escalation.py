"""The agent core against a real mosquitto and real onnxruntime, with a test responder as the hub."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pytest

from edge_agent.escalation import EscalationClient, EscalationStats
from edge_agent.policy import make_policy
from edge_agent.runtime import EdgeRuntime
from edge_agent.service import EdgeService, InferenceResult
from shared import topics
from shared.bundle import VerifiedBundle
from shared.messages import EscalationAnswer, EscalationRequest, encode_answer
from shared.mqtt import MqttClient
from tests.agent_fixtures import Responder, tensor_with_confidence

pytest_plugins = ["tests.agent_fixtures"]

pytestmark = pytest.mark.integration

DEVICE = "cam-7"


@dataclass
class Edge:
    service: EdgeService
    escalator: EscalationClient
    mqtt: MqttClient

    def infer(self, tensor: np.ndarray) -> InferenceResult:
        return asyncio.run(self.service.infer(tensor))


@pytest.fixture
def make_edge(broker, bundle_v1: VerifiedBundle) -> Iterator[Callable[..., Edge]]:  # noqa: ANN001
    clients: list[MqttClient] = []

    def make(timeout: float = 2.0, policy: str = "threshold", threshold: float = 0.8) -> Edge:
        mqtt = MqttClient(broker.url, f"agent-{DEVICE}-{len(clients)}")
        clients.append(mqtt)
        escalator = EscalationClient(mqtt, DEVICE)
        escalator.subscribe()
        mqtt.start()
        service = EdgeService(
            EdgeRuntime.load(bundle_v1),
            make_policy(policy, threshold),
            escalator,
            device_id=DEVICE,
            region="north",
            escalation_timeout_s=timeout,
        )
        return Edge(service, escalator, mqtt)

    yield make
    for c in clients:
        c.stop()


def wait_stats(edge: Edge, check: Callable[[EscalationStats], bool], timeout: float = 5.0) -> EscalationStats:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = edge.escalator.stats()
        if check(stats):
            return stats
        time.sleep(0.01)
    raise AssertionError(f"stats never satisfied the check: {edge.escalator.stats()}")


def test_confident_case_stays_at_the_edge(make_edge, responder: Responder) -> None:  # noqa: ANN001
    edge = make_edge()
    local = edge.infer(tensor_with_confidence(0.95, label=1))
    assert (local.source, local.escalated, local.label, local.label_name) == ("edge", False, 1, "defect")
    assert local.confidence == pytest.approx(0.95, abs=1e-4)
    assert (local.model_name, local.model_version) == ("tiny", "1.0.0")
    # Messages from one client on one topic arrive in order: if the confident case had been sent,
    # the responder would have received it before this unconfident one.
    cloud = edge.infer(tensor_with_confidence(0.6, label=1))
    assert [r.request_id for r in responder.received] == [cloud.request_id]
    assert edge.escalator.stats().sent == 1


def test_unconfident_case_is_answered_by_the_cloud(make_edge, responder: Responder) -> None:  # noqa: ANN001
    edge = make_edge()
    x = tensor_with_confidence(0.6, label=1)
    r = edge.infer(x)
    assert (r.source, r.escalated, r.label, r.label_name) == ("cloud", True, 0, "ok")
    assert r.confidence == pytest.approx(0.97) and r.probabilities == pytest.approx([0.97, 0.03])
    assert (r.edge_label, r.cloud_model, r.fallback_reason) == (1, "cloud:9", None)
    assert r.edge_confidence == pytest.approx(0.6, abs=1e-4)
    (req,) = responder.received
    assert (req.request_id, req.device_id, req.region, req.task) == (
        r.request_id,
        DEVICE,
        "north",
        "tiny-binary",
    )
    assert (req.model_name, req.model_version, req.edge_label) == ("tiny", "1.0.0", 1)
    assert edge.escalator.stats().answered == 1 and edge.escalator.pending == 0


def test_no_responder_falls_back_within_the_timeout(make_edge) -> None:  # noqa: ANN001
    timeout = 0.3
    edge = make_edge(timeout=timeout)
    # What the same call costs without waiting for the hub, measured now: the margin follows the
    # machine's current load instead of a guess.
    local = edge.infer(tensor_with_confidence(0.99, label=1)).latency_ms / 1000
    started = time.perf_counter()
    r = edge.infer(tensor_with_confidence(0.6, label=1))
    elapsed = time.perf_counter() - started
    assert (r.source, r.escalated, r.label) == ("edge-fallback", True, 1)
    assert r.fallback_reason == "no answer from the hub within 0.3 s"
    assert timeout <= elapsed < timeout + 2 * local + 0.15, (elapsed, local)
    assert r.latency_ms / 1000 <= elapsed
    stats = edge.escalator.stats()
    assert (stats.sent, stats.timeouts, edge.escalator.pending) == (1, 1, 0)


def test_broker_down_falls_back_at_once(make_edge, broker) -> None:  # noqa: ANN001
    edge = make_edge(timeout=5.0)
    broker.stop()
    deadline = time.monotonic() + 10
    while edge.mqtt.connected and time.monotonic() < deadline:
        time.sleep(0.02)
    started = time.perf_counter()
    r = edge.infer(tensor_with_confidence(0.6, label=0))
    assert time.perf_counter() - started < 1.0
    assert (r.source, r.label, r.fallback_reason) == ("edge-fallback", 0, "broker not connected")
    assert edge.escalator.pending == 0


def test_duplicate_answers_are_applied_once(make_edge, responder: Responder) -> None:  # noqa: ANN001
    responder.copies = 3
    edge = make_edge()
    r = edge.infer(tensor_with_confidence(0.6, label=1))
    assert r.source == "cloud"
    stats = wait_stats(edge, lambda s: s.duplicates == 2)
    assert (stats.answered, stats.malformed, stats.unknown) == (1, 0, 0)


def test_malformed_answer_is_counted_and_ignored(make_edge, responder: Responder) -> None:  # noqa: ANN001
    responder.malformed_first = True
    edge = make_edge()
    r = edge.infer(tensor_with_confidence(0.6, label=1))
    assert r.source == "cloud" and r.label == 0
    stats = edge.escalator.stats()
    assert (stats.malformed, stats.answered) == (1, 1)
    # A malformed payload did not break the network thread: the next escalation still works.
    assert edge.infer(tensor_with_confidence(0.55, label=0)).source == "cloud"


def test_late_and_unknown_answers_are_counted_not_applied(make_edge, responder: Responder) -> None:  # noqa: ANN001
    responder.delay_s = 0.5
    edge = make_edge(timeout=0.1)
    r = edge.infer(tensor_with_confidence(0.6, label=1))
    assert r.source == "edge-fallback"
    wait_stats(edge, lambda s: s.late == 1)
    stranger = EscalationAnswer(request_id="never-sent", ok=True, label=1, confidence=0.9)
    edge.mqtt.publish(topics.answer(DEVICE), encode_answer(stranger), correlation_data=b"never-sent")
    mismatched = EscalationAnswer(request_id=r.request_id, ok=True, label=1, confidence=0.9)
    edge.mqtt.publish(topics.answer(DEVICE), encode_answer(mismatched), correlation_data=b"other-id")
    stats = wait_stats(edge, lambda s: s.unknown == 1 and s.malformed == 1)
    assert stats.answered == 0


def _error_answer(req: EscalationRequest, tensor: np.ndarray) -> tuple[EscalationAnswer, np.ndarray | None]:
    return EscalationAnswer(
        request_id=req.request_id, ok=False, error="shape [1, 1, 8, 8] unsupported", error_kind="bad_input"
    ), None


def _out_of_range(req: EscalationRequest, tensor: np.ndarray) -> tuple[EscalationAnswer, np.ndarray | None]:
    return EscalationAnswer(request_id=req.request_id, ok=True, label=5, confidence=0.9), None


@pytest.mark.parametrize(
    ("answer_fn", "reason"),
    [
        (_error_answer, "hub error: bad_input: shape [1, 1, 8, 8] unsupported"),
        (_out_of_range, "hub answered label 5, which this model's 2 labels do not have"),
    ],
)
def test_unusable_cloud_answers_fall_back(make_edge, responder: Responder, answer_fn, reason: str) -> None:  # noqa: ANN001
    responder.answer_fn = answer_fn
    r = make_edge().infer(tensor_with_confidence(0.6, label=1))
    assert (r.source, r.label, r.fallback_reason) == ("edge-fallback", 1, reason)


def test_policies_edge_only_and_cloud_only(make_edge, responder: Responder) -> None:  # noqa: ANN001
    assert make_edge(policy="edge-only").infer(tensor_with_confidence(0.51)).source == "edge"
    cloud = make_edge(policy="cloud-only").infer(tensor_with_confidence(0.99, label=1))
    assert (cloud.source, cloud.label) == ("cloud", 0)


def test_concurrent_escalations_each_get_their_own_answer(make_edge, responder: Responder) -> None:  # noqa: ANN001
    edge = make_edge()
    cases = [tensor_with_confidence(0.55 + 0.01 * i, label=i % 2) for i in range(20)]

    async def all_cases() -> list[InferenceResult]:
        return await asyncio.gather(*(edge.service.infer(x) for x in cases))

    results = asyncio.run(all_cases())
    assert [r.source for r in results] == ["cloud"] * 20
    assert [r.label for r in results] == [1 - (i % 2) for i in range(20)]  # flip_answer of each own case
    assert len({r.request_id for r in results}) == 20 and edge.escalator.pending == 0


def test_request_ids_must_be_unique_while_waiting(make_edge, responder: Responder) -> None:  # noqa: ANN001
    responder.delay_s = 0.3
    edge = make_edge()
    req = EscalationRequest(request_id="same", device_id=DEVICE, task="t")
    x = tensor_with_confidence(0.6)

    async def twice() -> None:
        first = asyncio.create_task(edge.escalator.escalate(req, x, 2.0))
        await asyncio.sleep(0)
        with pytest.raises(ValueError, match="already waiting"):
            await edge.escalator.escalate(req, x, 2.0)
        assert (await first) is not None

    asyncio.run(twice())
