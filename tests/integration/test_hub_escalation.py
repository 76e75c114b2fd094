"""Escalations over real MQTT (mosquitto) to a real hub: answers, error answers, metrics, device state."""

from __future__ import annotations

import queue
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shared import topics
from shared.codec import encode_frame
from shared.messages import (
    DeviceStatus,
    EscalationAnswer,
    EscalationRequest,
    decode_answer,
    encode_request,
)
from shared.mqtt import Message, MqttClient
from tests.hub_fixtures import HubProcess

pytest_plugins = ["tests.hub_fixtures"]
pytestmark = pytest.mark.integration


class Device:
    """A test device on the real broker: publishes escalations, collects answers by correlation data."""

    def __init__(self, hub: HubProcess, device_id: str) -> None:
        self.device_id = device_id
        self._answers: queue.Queue[Message] = queue.Queue()
        self.client = MqttClient(hub.broker_url, f"test-{device_id}-{uuid.uuid4().hex[:6]}")
        self.client.subscribe(topics.answer(device_id), self._answers.put, qos=1)

    def escalate(
        self, payload: bytes, corr: str, *, response_topic: str | None = "own", topic: str | None = None
    ) -> None:
        rt = topics.answer(self.device_id) if response_topic == "own" else response_topic
        self.client.publish(
            topic or topics.escalate(self.device_id),
            payload,
            qos=1,
            response_topic=rt,
            correlation_data=corr.encode(),
        )

    def request(self, corr: str, tensor: np.ndarray, task: str = "t", device_id: str | None = None) -> bytes:
        req = EscalationRequest(request_id=corr, device_id=device_id or self.device_id, task=task)
        return encode_request(req, tensor)

    def answer(self, corr: str, timeout: float = 15.0) -> tuple[EscalationAnswer, np.ndarray | None]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                msg = self._answers.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if msg.correlation_data == corr.encode():
                return decode_answer(msg.payload)
        raise AssertionError(f"no answer with correlation data {corr!r} within {timeout} s")

    def no_answer(self, wait: float = 1.0) -> list[Message]:
        time.sleep(wait)
        out = []
        while not self._answers.empty():
            out.append(self._answers.get_nowait())
        return out


@contextmanager
def _started(dev: Device) -> Iterator[Device]:
    dev.client.start()
    try:
        yield dev
    finally:
        dev.client.stop()


@pytest.fixture
def device(module_hub: HubProcess, request: pytest.FixtureRequest) -> Iterator[Device]:
    with _started(
        Device(module_hub, f"esc-{request.node.name[5:25].replace('_', '-')}-{uuid.uuid4().hex[:4]}")
    ) as dev:
        yield dev


def _x(seed: int = 0, shape: tuple[int, ...] = (1, 1, 32, 32)) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _errors(hub: HubProcess) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(hub.metrics_text()):
        if family.name == "edgefed_hub_escalation_errors":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    out[sample.labels["kind"]] = sample.value
    return out


def _delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)}


def test_escalation_is_answered_with_its_correlation_data_and_the_cloud_label(
    module_hub: HubProcess, device: Device
) -> None:
    with module_hub.client() as admin:
        admin.register_device(device.device_id, "north")
    xs = [_x(i) for i in range(3)]
    for i, x in enumerate(xs):
        device.escalate(device.request(f"req-{i}", x), f"req-{i}")
    with module_hub.http() as http:
        r = http.post("/api/v1/predict", content=encode_frame(0, {"task": "t"}, np.concatenate(xs)))
    expected = r.json()
    for i in range(3):
        answer, probs = device.answer(f"req-{i}")
        assert answer.ok and answer.error is None and answer.request_id == f"req-{i}"
        assert answer.label == expected["labels"][i]
        assert answer.confidence == pytest.approx(expected["confidences"][i], abs=1e-5)
        assert (answer.model_name, answer.model_version) == ("t-cloud", "1")
        assert answer.worker.startswith("hub-") and answer.inference_ms > 0
        assert probs is not None and probs.shape == (2,) and probs.dtype == np.float32
        assert probs.sum() == pytest.approx(1.0, abs=1e-5)

    # Escalations are counted per device in batched writes (about once a second).
    deadline = time.monotonic() + 10
    with module_hub.client() as admin:
        while (state := admin.get_device(device.device_id)).escalations < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
    assert state.escalations == 3 and state.online and state.last_seen is not None

    # /metrics: this device's escalations by outcome, and the fleet online by region (read at scrape).
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(module_hub.metrics_text())
        for s in f.samples
    }
    mine = {
        dict(labels)["outcome"]: value
        for (name, labels), value in samples.items()
        if name == "edgefed_hub_device_escalations_total" and dict(labels)["device_id"] == device.device_id
    }
    assert mine == {"answered": 3.0, "error": 0.0}
    assert samples[("edgefed_hub_devices_online", (("region", "north"),))] >= 1
    assert samples[("edgefed_hub_devices", (("region", "north"),))] >= 1


def test_malformed_escalations_get_error_answers_and_the_worker_keeps_going(
    module_hub: HubProcess, device: Device
) -> None:
    before = _errors(module_hub)
    good = device.request("ok-0", _x())
    cases = {
        "garbage": (b"\x00\x01garbage bytes", "bad_payload", "bad magic"),
        "truncated": (good[: len(good) // 2], "bad_payload", "tensor data is"),
        "shape": (
            device.request("shape", _x(shape=(1, 1, 16, 16))),
            "bad_shape",
            "does not fit model t-cloud:1",
        ),
        "batch": (device.request("batch", _x(shape=(2, 1, 32, 32))), "bad_shape", "one sample"),
        "task": (device.request("task", _x(), task="no-such-task"), "unknown_task", "'no-such-task'"),
        "dtype": (device.request("dtype", _x().astype(np.float64)), "bad_dtype", "float64"),
        "impostor": (
            device.request("impostor", _x(), device_id="someone-else"),
            "device_mismatch",
            "someone-else",
        ),
    }
    for corr, (payload, _, _) in cases.items():
        device.escalate(payload, corr)
    for corr, (_, kind, needle) in cases.items():
        answer, probs = device.answer(corr)
        assert not answer.ok and answer.error_kind == kind and needle in (answer.error or ""), (corr, answer)
        assert answer.label is None and probs is None
    device.escalate(good, "ok-0")
    assert device.answer("ok-0")[0].ok
    assert _delta(before, _errors(module_hub)) == {
        "bad_payload": 2,
        "bad_shape": 2,
        "unknown_task": 1,
        "bad_dtype": 1,
        "device_mismatch": 1,
    }


def test_escalations_without_a_usable_response_topic_are_counted_not_answered(
    module_hub: HubProcess, device: Device
) -> None:
    before = _errors(module_hub)
    with _started(Device(module_hub, f"esc-victim-{uuid.uuid4().hex[:4]}")) as victim:
        device.escalate(device.request("no-rt", _x()), "no-rt", response_topic=None)
        # A device may not make the hub publish into another device's topics.
        device.escalate(
            device.request("steer", _x()), "steer", response_topic=topics.answer(victim.device_id)
        )
        assert victim.no_answer(1.0) == []
    assert device.no_answer(0.1) == []
    device.escalate(device.request("after", _x()), "after")
    assert device.answer("after")[0].ok
    assert _delta(before, _errors(module_hub)) == {"no_response_topic": 1, "bad_response_topic": 1}


def test_device_status_messages_update_online_state(module_hub: HubProcess, device: Device) -> None:
    with module_hub.client() as admin:
        admin.register_device(device.device_id, "east")

        def wait_online(expected: bool) -> None:
            deadline = time.monotonic() + 10
            while admin.get_device(device.device_id).online != expected and time.monotonic() < deadline:
                time.sleep(0.2)
            assert admin.get_device(device.device_id).online == expected

        status = DeviceStatus(device_id=device.device_id, state="online", region="east")
        device.client.publish(topics.status(device.device_id), status.model_dump_json().encode(), retain=True)
        wait_online(True)
        offline = DeviceStatus(device_id=device.device_id, state="offline")
        device.client.publish(
            topics.status(device.device_id), offline.model_dump_json().encode(), retain=True
        )
        wait_online(False)
        # Malformed or mismatched status messages change nothing.
        device.client.publish(topics.status(device.device_id), b"{not json", retain=False)
        wrong = DeviceStatus(device_id="someone-else", state="online")
        device.client.publish(topics.status(device.device_id), wrong.model_dump_json().encode(), retain=False)
        time.sleep(1.5)
        assert not admin.get_device(device.device_id).online
        device.client.publish(topics.status(device.device_id), b"", retain=True)  # clear the retained status
    assert httpx.get(f"{module_hub.base_url}/healthz", timeout=5).status_code == 200
