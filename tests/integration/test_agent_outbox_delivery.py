"""Unanswered escalations wait in the outbox and reach the hub once the link is back (real broker)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edge_agent.escalation import EscalationClient
from edge_agent.outbox import Outbox, OutboxSender
from edge_agent.policy import make_policy
from edge_agent.runtime import EdgeRuntime
from edge_agent.service import EdgeService
from shared.bundle import VerifiedBundle
from shared.mqtt import MqttClient
from tests.agent_fixtures import Responder, tensor_with_confidence

pytest_plugins = ["tests.agent_fixtures"]

pytestmark = pytest.mark.integration


def wait_until(check: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


@pytest.fixture
def edge(broker, bundle_v1: VerifiedBundle, tmp_path: Path) -> Iterator[EdgeService]:  # noqa: ANN001
    mqtt = MqttClient(broker.url, "agent-outbox")
    escalator = EscalationClient(mqtt, "cam-out")
    escalator.subscribe()
    outbox = Outbox(tmp_path / "outbox.sqlite3").open()
    sender = OutboxSender(outbox, escalator, timeout_s=1.0, idle_s=0.05)
    mqtt.on_connect(sender.kick)
    mqtt.start()
    sender.start()
    service = EdgeService(
        EdgeRuntime.load(bundle_v1),
        make_policy("threshold", 0.8),
        escalator,
        device_id="cam-out",
        escalation_timeout_s=0.2,
        outbox=outbox,
    )
    try:
        yield service
    finally:
        sender.stop()
        mqtt.stop()
        outbox.close()


def test_unanswered_case_is_delivered_once_the_hub_is_back(edge: EdgeService, broker) -> None:  # noqa: ANN001
    assert edge.outbox is not None
    r = asyncio.run(edge.infer(tensor_with_confidence(0.6)))
    assert (r.source, r.queued) == ("edge-fallback", True)
    assert [it.request_id for it in edge.outbox.oldest(5)] == [r.request_id]
    responder = Responder(broker.url).start()
    try:
        wait_until(lambda: edge.outbox is not None and len(edge.outbox) == 0)
        assert r.request_id in [q.request_id for q in responder.received]
        assert edge.outbox.delivered == 1
    finally:
        responder.stop()


def test_cases_queued_while_the_broker_is_down_are_sent_after_it_restarts(
    edge: EdgeService,
    broker,  # noqa: ANN001
) -> None:
    assert edge.outbox is not None and edge.escalator is not None
    broker.stop()
    wait_until(lambda: not edge.escalator.connected)  # type: ignore[union-attr]
    ids = [asyncio.run(edge.infer(tensor_with_confidence(0.6 + 0.01 * i))).request_id for i in range(3)]
    assert len(edge.outbox) == 3
    broker.start()
    responder = Responder(broker.url).start()
    try:
        wait_until(lambda: edge.outbox is not None and len(edge.outbox) == 0)
        assert sorted(ids) == sorted(q.request_id for q in responder.received if q.request_id in ids)
        # Live escalations work again too.
        assert asyncio.run(edge.infer(tensor_with_confidence(0.6))).source == "cloud"
    finally:
        responder.stop()


def test_unanswered_rounds_back_off_and_a_reconnect_resets_the_wait(broker, tmp_path: Path) -> None:  # noqa: ANN001
    mqtt = MqttClient(broker.url, "agent-backoff")
    escalator = EscalationClient(mqtt, "cam-backoff")
    escalator.subscribe()
    outbox = Outbox(tmp_path / "o.sqlite3").open()
    outbox.put("only", b"not-even-a-frame")  # nobody answers: every round is a failure
    sender = OutboxSender(outbox, escalator, timeout_s=0.02, idle_s=0.02, max_backoff_s=0.32)
    mqtt.start()
    sender.start()
    try:
        time.sleep(1.5)
        # Without backoff: about 1.5 / 0.04 = 37 rounds. With doubling waits (0.04, 0.08 ... 0.32, 0.32 ...):
        # about 8.
        assert 4 <= sender.rounds <= 12, sender.rounds
        before = sender.rounds
        sender.kick()
        wait_until(lambda: sender.rounds > before, timeout=0.2)  # at once, not after the 0.32 s wait
        # Each failed round is counted on the case, which stays queued.
        wait_until(lambda: outbox.oldest(1)[0].attempts >= before + 1, timeout=1.0)
    finally:
        sender.stop()
        mqtt.stop()
        outbox.close()
