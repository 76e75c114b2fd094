"""The local HTTP API of an in-process agent (stand-in hub over HTTP, real mosquitto, real ORT)."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from contextlib import ExitStack

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from edge_agent.agent import Agent
from edge_agent.config import build_settings
from shared.broker import DevBroker
from shared.bundle import generate_keypair
from shared.codec import encode_frame
from shared.processes import free_port
from tests.agent_fixtures import Responder, StandInHub, make_bundle, tensor_with_confidence

pytestmark = pytest.mark.integration

TENSOR = "application/x-edgefed-tensor"


def image_bytes(value: int, fmt: str = "PNG", size: tuple[int, int] = (8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size, color=value).save(buf, format=fmt)
    return buf.getvalue()


def frame(tensor: np.ndarray | None) -> bytes:
    return encode_frame(0, {}, tensor)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """One agent for the module: these tests only read from it, so they share it (and its broker)."""
    tmp = tmp_path_factory.mktemp("api")
    key = generate_keypair(tmp / "k.pem", tmp / "k.pub")
    bundle = make_bundle(tmp / "made" / "tiny-1.0.0", key)
    with ExitStack() as stack:
        broker = DevBroker("127.0.0.1", free_port(), tmp / "broker").start()
        stack.callback(broker.stop)
        hub = StandInHub([(tmp / "k.pub").read_text()]).start()
        stack.callback(hub.stop)
        hub.publish(bundle)
        stack.callback(Responder(broker.url).start().stop)
        settings = build_settings(
            hub_url=hub.url,
            broker_url=broker.url,
            device_id="cam-api",
            region="r1",
            data_dir=tmp / "agent",
            max_body_bytes=64 * 1024,
            escalation_timeout_s=2.0,
        )
        agent = Agent(settings)
        stack.callback(agent.stop)
        agent.start()
        assert agent.app is not None
        yield stack.enter_context(TestClient(agent.app))


def test_healthz_reports_the_model_and_the_broker(client: TestClient) -> None:
    r = client.get("/healthz")
    assert r.status_code == 200
    assert r.json() == {
        "status": "ok",
        "device_id": "cam-api",
        "model_name": "tiny",
        "model_version": "1.0.0",
        "policy": "threshold",
        "broker_connected": True,
        "breaker": "closed",
    }


@pytest.mark.parametrize(("fmt", "ctype"), [("PNG", "image/png"), ("JPEG", "image/jpeg")])
def test_images_are_preprocessed_by_the_spec(client: TestClient, fmt: str, ctype: str) -> None:
    # mean/std 0.5: white -> +1 everywhere -> P(defect) = sigmoid(10); a 300x300 image is resized first.
    r = client.post("/v1/infer", content=image_bytes(255, fmt, (300, 300)), headers={"Content-Type": ctype})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["label_name"], body["source"], body["escalated"]) == ("defect", "edge", False)
    assert body["confidence"] > 0.999 and body["latency_ms"] > 0


def test_unsure_image_is_escalated(client: TestClient) -> None:
    r = client.post("/v1/infer", content=image_bytes(128), headers={"Content-Type": "image/png"})
    assert r.status_code == 200
    assert (r.json()["source"], r.json()["escalated"]) == ("cloud", True)


def test_tensor_frame(client: TestClient) -> None:
    r = client.post("/v1/infer", content=frame(tensor_with_confidence(0.9, label=0)), headers={"Content-Type": TENSOR})
    assert r.status_code == 200
    assert (r.json()["label"], r.json()["source"]) == (0, "edge")
    assert r.json()["probabilities"] == pytest.approx([0.9, 0.1], abs=1e-4)


def _bomb() -> bytes:
    # 7000x7000 = 49 megapixels, a few kB as PNG: must be refused from its header, not decoded.
    return image_bytes(0, "PNG", (7000, 7000))


@pytest.mark.parametrize(
    ("body", "ctype", "status", "detail"),
    [
        (frame(np.zeros((1, 1, 4, 4), np.float32)), TENSOR, 400, r"shape \[1, 1, 4, 4\]"),
        (frame(np.zeros((1, 1, 8, 8), np.float64)), TENSOR, 400, "dtype is float64"),
        (frame(np.full((1, 1, 8, 8), np.nan, np.float32)), TENSOR, 400, "NaN"),
        (frame(np.zeros((2, 1, 8, 8), np.float32)), TENSOR, 400, "batch size is 2, use 1"),
        (frame(None), TENSOR, 400, "carries no tensor"),
        (b"EFT1\x00garbage", TENSOR, 400, "tensor frame is malformed"),
        (b"\x89PNG\r\n\x1a\nnot really", "image/png", 400, "not a readable PNG or JPEG"),
        (_bomb(), "image/png", 400, "megapixels"),
        (image_bytes(0, "GIF"), "image/png", 400, "GIF is not accepted"),
        (b"", "image/png", 400, "body is empty"),
        (b"x" * (64 * 1024 + 1), "image/png", 413, "limit is 65536"),
        (b"{}", "application/json", 415, "'application/json' is not supported"),
        (b"abc", "", 415, r"'\(none\)' is not supported"),
    ],
)
def test_bad_input_gets_4xx_naming_the_problem(
    client: TestClient, body: bytes, ctype: str, status: int, detail: str
) -> None:
    headers = {"Content-Type": ctype} if ctype else {}
    r = client.post("/v1/infer", content=body, headers=headers)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"detail"}
    assert re.search(detail, r.json()["detail"]), r.json()["detail"]
    # ... and the agent keeps serving.
    ok = client.post("/v1/infer", content=frame(tensor_with_confidence(0.9)), headers={"Content-Type": TENSOR})
    assert ok.status_code == 200


def test_stats_count_requests_and_escalations(client: TestClient) -> None:
    before = client.get("/v1/stats").json()
    client.post("/v1/infer", content=frame(tensor_with_confidence(0.9)), headers={"Content-Type": TENSOR})
    client.post("/v1/infer", content=frame(tensor_with_confidence(0.6)), headers={"Content-Type": TENSOR})
    client.post("/v1/infer", content=b"", headers={"Content-Type": TENSOR})
    after = client.get("/v1/stats").json()
    delta = {k: after["requests"][k] - before["requests"][k] for k in after["requests"]}
    assert delta == {
        "requests": 2,
        "edge": 1,
        "cloud": 1,
        "fallback": 0,
        "short_circuited": 0,
        "late_applied": 0,
        "feedback": 0,
    }
    assert after["escalation"]["sent"] - before["escalation"]["sent"] == 1
    assert after["escalation"]["answered"] - before["escalation"]["answered"] == 1
