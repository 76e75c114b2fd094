"""Nothing lost, nothing applied twice: an in-process agent against a real hub (`edgefed hub serve`)
while the broker and then the hub are killed and restarted mid-stream."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pytest

from edge_agent.agent import Agent
from edge_agent.config import build_settings
from edge_agent.learning_store import read_cases
from edge_agent.service import InferenceResult
from shared.broker import DevBroker
from shared.processes import free_port
from tests.agent_fixtures import wait_until
from tests.hub_fixtures import INPUT_SHAPE, HubModels, HubProcess, start_hub_with_models

pytest_plugins = ["tests.hub_fixtures"]

pytestmark = pytest.mark.integration


@dataclass
class Rig:
    broker: DevBroker
    hub: HubProcess
    agent: Agent


@pytest.fixture(scope="module")
def rig(hub_models: HubModels, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    """A broker, a hub and an agent of their own: the tests restart the broker and the hub."""
    tmp = tmp_path_factory.mktemp("restarts")
    broker = DevBroker("127.0.0.1", free_port(), tmp / "broker").start()
    hub = agent = None
    try:
        hub = start_hub_with_models(tmp / "hub", broker.url, hub_models)
        with hub.client() as admin:
            token = admin.register_device("line-r", "r1").token
        settings = build_settings(
            hub_url=hub.base_url,
            broker_url=broker.url,
            device_id="line-r",
            region="r1",
            token=token,
            trusted_key=hub_models.public_key_path,
            data_dir=tmp / "agent",
            policy="cloud-only",
            escalation_timeout_s=1.0,
            breaker_failures=3,
            breaker_cooldown_s=0.5,
            outbox_max_backoff_s=1.0,
            telemetry_interval_s=60.0,
        )
        agent = Agent(settings)
        agent.start()
        yield Rig(broker, hub, agent)
    finally:
        if agent is not None:
            agent.stop()
        if hub is not None:
            hub.stop()
        broker.stop()


def _stream(agent: Agent, n: int, gap_s: float, results: list[InferenceResult]) -> threading.Thread:
    rng = np.random.default_rng(len(results) + n)
    assert agent.service is not None
    service = agent.service

    def run() -> None:
        for _ in range(n):
            x = rng.normal(0, 3, size=INPUT_SHAPE).astype(np.float32)
            results.append(asyncio.run(service.infer(x)))
            time.sleep(gap_s)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _check_exactly_once(rig: Rig, results: list[InferenceResult], applied_before: int) -> None:
    service = rig.agent.service
    assert service is not None and service.outbox is not None
    wait_until(lambda: len(service.outbox) == 0, timeout=30, what="outbox drained")  # type: ignore[union-attr]
    ids = [r.request_id for r in results]
    assert all(r.escalated for r in results)
    fell_back = [r for r in results if r.source == "edge-fallback"]
    assert fell_back, "the outage did not affect any case: the test proved nothing"
    assert all(r.queued for r in fell_back), [r.fallback_reason for r in fell_back if not r.queued]
    stats = service.stats()
    # Each case got exactly one cloud answer applied: live (cloud) or later through the outbox.
    assert stats.cloud + stats.late_applied - applied_before == len(results)
    cases = {c.request_id: c for c in read_cases(rig.agent.settings.learning_path)}
    missing = [i for i in ids if i not in cases or cases[i].cloud_label is None]
    assert not missing, f"{len(missing)} escalations never answered"
    assert all(cases[i].cloud_probabilities is not None for i in ids)


def _applied(rig: Rig) -> int:
    assert rig.agent.service is not None
    s = rig.agent.service.stats()
    return s.cloud + s.late_applied


def _wait(cond: Callable[[], bool], what: str) -> None:
    wait_until(cond, timeout=30, what=what)


def test_broker_killed_and_restarted_mid_stream(rig: Rig) -> None:
    before = _applied(rig)
    results: list[InferenceResult] = []
    stream = _stream(rig.agent, 30, 0.05, results)
    _wait(lambda: len(results) >= 8, "first cases")
    rig.broker.stop()
    time.sleep(1.0)
    rig.broker.start()
    stream.join(60)
    assert len(results) == 30
    _check_exactly_once(rig, results, before)


def test_hub_restarted_mid_stream(rig: Rig) -> None:
    before = _applied(rig)
    results: list[InferenceResult] = []
    stream = _stream(rig.agent, 30, 0.1, results)
    _wait(lambda: len(results) >= 5, "first cases")
    rig.hub.restart()
    rig.hub.wait_ready()
    stream.join(90)
    assert len(results) == 30
    _check_exactly_once(rig, results, before)
    assert rig.agent.service is not None and rig.agent.service.breaker is not None
    assert rig.agent.service.breaker.state == "closed"


def test_late_answers_from_the_hub_are_applied_once(rig: Rig) -> None:
    # A timeout shorter than the hub's inference: every live escalation gives up, the hub's answer
    # arrives late while the outbox re-sends the same case, and the answers race. One must win, once.
    service = rig.agent.service
    assert service is not None and service.breaker is not None
    before = _applied(rig)
    late_before = service.escalator.stats().late  # type: ignore[union-attr]
    service.escalation_timeout_s = 0.001
    try:
        results: list[InferenceResult] = []
        _stream(rig.agent, 15, 0.02, results).join(60)
    finally:
        service.escalation_timeout_s = rig.agent.settings.escalation_timeout_s
    assert len(results) == 15
    _check_exactly_once(rig, results, before)
    stats = service.escalator.stats()  # type: ignore[union-attr]
    assert stats.late + stats.duplicates - late_before > 0, "no answer raced: the test proved nothing"
