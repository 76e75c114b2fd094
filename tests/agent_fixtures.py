"""Fixtures and helpers for edge-agent tests: tiny signed ONNX bundles (no torch), a test responder
on the real broker, a stand-in hub over real HTTP, and ``AgentProcess`` for ``edgefed agent run``.

Load from a test module with ``pytest_plugins = ["tests.agent_fixtures"]``.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx
import pytest
import uvicorn
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import FastAPI, HTTPException, Response
from onnx import TensorProto, helper, numpy_helper

from shared import topics
from shared.api_schemas import AssignmentPublic, RunningReport, SigningKeysPublic
from shared.bundle import (
    InputSpec,
    Manifest,
    VerifiedBundle,
    generate_keypair,
    pack_bundle,
    public_key_pem,
    write_bundle,
)
from shared.messages import EscalationAnswer, EscalationRequest, decode_request, encode_answer, encode_request
from shared.mqtt import Message, MqttClient
from shared.processes import ManagedProcess, free_port, wait_for_http

__all__ = [
    "LABELS",
    "SCALE",
    "AgentProcess",
    "ServedApp",
    "Responder",
    "StandInHub",
    "install_bundle",
    "make_bundle",
    "make_onnx_model",
    "tensor_with_confidence",
    "wait_until",
]

LABELS = ["ok", "defect"]
SCALE = 10.0
SHAPE = [1, 1, 8, 8]


# --- models and bundles -------------------------------------------------------------------------
def make_onnx_model(
    path: Path,
    *,
    scale: float = SCALE,
    dynamic_batch: bool = True,
    input_name: str = "input",
    n_classes: int = 2,
) -> Path:
    """Input [N,1,8,8] -> Flatten -> Gemm -> logits; logit1 - logit0 = scale * mean(x).

    So a constant input v gives P(defect) = sigmoid(scale * v): confidence is chosen by choosing v.
    """
    w = np.zeros((64, n_classes), dtype=np.float32)
    w[:, 1] = scale / 64.0
    b = np.zeros((n_classes,), dtype=np.float32)
    batch: str | int = "N" if dynamic_batch else 1
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", [input_name], ["flat"], axis=1),
            helper.make_node("Gemm", ["flat", "W", "B"], ["logits"]),
        ],
        "tiny_edge",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [batch, 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, n_classes])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def tensor_with_confidence(confidence: float, label: int = 1, scale: float = SCALE) -> np.ndarray:
    """A 1x1x8x8 float32 input for which the tiny model says ``label`` with this confidence."""
    v = float(np.log(confidence / (1.0 - confidence))) / scale
    return np.full(SHAPE, v if label == 1 else -v, dtype=np.float32)


def make_bundle(
    out_dir: Path,
    key: Ed25519PrivateKey,
    *,
    name: str = "tiny",
    version: str = "1.0.0",
    scale: float = SCALE,
    created_at: str | None = None,
    **model_kw: object,
) -> VerifiedBundle:
    """A signed bundle of the tiny model (mean/std 0.5 so a white image is a confident 'defect')."""
    model = make_onnx_model(out_dir.parent / f".{out_dir.name}.onnx", scale=scale, **model_kw)  # type: ignore[arg-type]
    manifest = Manifest(
        name=name,
        version=version,
        task="tiny-binary",
        created_at=created_at or datetime.now(UTC).isoformat(),
        input=InputSpec(shape=SHAPE, mean=[0.5], std=[0.5]),
        labels=LABELS,
        model_sha256="0" * 64,
        model_size_bytes=0,
    )
    bundle = write_bundle(out_dir, model, manifest, key)
    model.unlink()
    return bundle


def install_bundle(data_dir: Path, bundle: VerifiedBundle) -> Path:
    """Copy a bundle where an agent with ``data_dir`` keeps verified bundles."""
    target = data_dir / "bundles" / f"{bundle.manifest.name}-{bundle.manifest.version}"
    shutil.copytree(bundle.path, target)
    return target


@dataclass
class SigningKeys:
    private: Ed25519PrivateKey
    public_path: Path

    @property
    def public_pem(self) -> bytes:
        return public_key_pem(self.private.public_key())


@pytest.fixture
def signing_keys(tmp_path: Path) -> SigningKeys:
    priv = tmp_path / "keys" / "signing.pem"
    pub = tmp_path / "keys" / "signing.pub.pem"
    return SigningKeys(generate_keypair(priv, pub), pub)


@pytest.fixture
def bundle_v1(tmp_path: Path, signing_keys: SigningKeys) -> VerifiedBundle:
    return make_bundle(tmp_path / "made" / "tiny-1.0.0", signing_keys.private)


# --- a test peer that answers escalations over the real broker -------------------------------
AnswerFn = Callable[[EscalationRequest, np.ndarray], tuple[EscalationAnswer, np.ndarray | None]]


def flip_answer(req: EscalationRequest, tensor: np.ndarray) -> tuple[EscalationAnswer, np.ndarray | None]:
    """Answer the label the edge did not pick, with 0.97 confidence: unmistakably the cloud's answer."""
    label = 1 - (req.edge_label or 0)
    probs = np.array([0.03, 0.97] if label == 1 else [0.97, 0.03], dtype=np.float32)
    answer = EscalationAnswer(
        request_id=req.request_id,
        ok=True,
        label=label,
        confidence=0.97,
        model_name="cloud",
        model_version="9",
        worker="test-responder",
    )
    return answer, probs


@dataclass
class Responder:
    """Subscribes like a hub worker and answers each escalation on its Response Topic."""

    broker_url: str
    answer_fn: AnswerFn = flip_answer
    copies: int = 1
    malformed_first: bool = False
    delay_s: float = 0.0
    received: list[EscalationRequest] = field(default_factory=list)
    client: MqttClient | None = None

    def start(self, timeout: float = 5.0) -> Responder:
        self.client = MqttClient(self.broker_url, f"test-responder-{free_port()}")
        self.client.subscribe("$share/hub/edgefed/v1/+/escalate", self._on_request)
        self.client.start()
        # The SUBACK is not observable through MqttClient: a probe through the broker proves the
        # subscription is active before any test publishes an escalation.
        probe = EscalationRequest(request_id=f"probe-{id(self)}", device_id="responder-probe", task="probe")
        self.client.publish(
            topics.escalate("responder-probe"),
            encode_request(probe, np.zeros(1, np.float32)),
            response_topic=topics.answer("responder-probe"),
            correlation_data=b"probe",
        )
        deadline = time.monotonic() + timeout
        while not any(r.request_id == probe.request_id for r in self.received):
            if time.monotonic() > deadline:
                raise TimeoutError("test responder's subscription did not become active")
            time.sleep(0.005)
        self.received.clear()
        return self

    def stop(self) -> None:
        if self.client is not None:
            self.client.stop()

    def _on_request(self, msg: Message) -> None:
        req, tensor = decode_request(msg.payload)
        self.received.append(req)
        answer, probs = self.answer_fn(req, tensor)
        if self.delay_s:
            threading.Timer(self.delay_s, self._send, (msg, answer, probs)).start()
        else:
            self._send(msg, answer, probs)

    def _send(self, msg: Message, answer: EscalationAnswer, probs: np.ndarray | None) -> None:
        assert self.client is not None and msg.response_topic
        if self.malformed_first:
            self.client.publish(msg.response_topic, b"EFT1 not a frame", correlation_data=msg.correlation_data)
        for _ in range(self.copies):
            self.client.publish(msg.response_topic, encode_answer(answer, probs), correlation_data=msg.correlation_data)


@pytest.fixture
def responder(broker) -> Iterator[Responder]:  # noqa: ANN001 - the lead's DevBroker fixture
    r = Responder(broker.url).start()
    try:
        yield r
    finally:
        r.stop()


# --- a stand-in hub: the REST surface the agent uses, over real HTTP ---------------------------
class StandInHub:
    """Serves /api/v1/keys, a device's assignment, artifacts and running reports on a free port."""

    def __init__(self, keys_pem: list[str]) -> None:
        self.keys_pem = keys_pem
        self.artifacts: dict[tuple[str, str], bytes] = {}
        self.assignment: tuple[str, str, str] | None = None
        self.running: list[tuple[str, str, str]] = []
        self.port = free_port()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def publish(self, bundle: VerifiedBundle, archive: bytes | None = None, assign: bool = True) -> None:
        m = bundle.manifest
        self.artifacts[(m.name, m.version)] = archive if archive is not None else pack_bundle(bundle.path)
        if assign:
            self.assignment = (m.name, m.version, m.model_sha256)

    def start(self) -> StandInHub:
        app = FastAPI()

        @app.get("/api/v1/keys")
        def keys() -> SigningKeysPublic:
            return SigningKeysPublic(keys=self.keys_pem)

        @app.get("/api/v1/devices/{device_id}/assignment")
        def assignment(device_id: str) -> AssignmentPublic:
            if self.assignment is None:
                raise HTTPException(404, "no assignment")
            name, version, sha = self.assignment
            return AssignmentPublic(device_id=device_id, model_name=name, version=version, sha256=sha)

        @app.get("/api/v1/models/{name}/versions/{version}/artifact")
        def artifact(name: str, version: str) -> Response:
            data = self.artifacts.get((name, version))
            if data is None:
                raise HTTPException(404, f"no artifact {name}:{version}")
            return Response(data, media_type="application/gzip")

        @app.put("/api/v1/devices/{device_id}/running")
        def running(device_id: str, body: RunningReport) -> dict[str, str]:
            self.running.append((device_id, body.model_name, body.version))
            return {"status": "ok"}

        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise TimeoutError("stand-in hub did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(10)


@pytest.fixture
def stand_in_hub(signing_keys: SigningKeys) -> Iterator[StandInHub]:
    h = StandInHub([signing_keys.public_pem.decode()]).start()
    try:
        yield h
    finally:
        h.stop()


# --- the agent as a process --------------------------------------------------------------------
def agent_command() -> list[str]:
    """``edgefed agent`` from this interpreter's environment."""
    return [str(Path(sys.executable).parent / "edgefed"), "agent"]


class AgentProcess:
    """``edgefed agent run ...`` on a free loopback port; ``start()`` waits for ``/healthz``."""

    def __init__(
        self,
        *,
        hub_url: str,
        broker_url: str,
        device_id: str,
        data_dir: Path,
        region: str = "r1",
        extra: list[str] | None = None,
        command: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.port = free_port()
        self.data_dir = data_dir
        argv = [
            *(command or agent_command()),
            "run",
            "--hub",
            hub_url,
            "--broker",
            broker_url,
            "--device-id",
            device_id,
            "--region",
            region,
            "--data-dir",
            str(data_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *(extra or []),
        ]
        self.process = ManagedProcess(f"agent-{device_id}", argv, data_dir.parent / f"agent-{device_id}.log", env=env)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> AgentProcess:
        self.process.start()
        try:
            wait_for_http(f"{self.url}/healthz", timeout, alive=self.process.alive)
        except (TimeoutError, RuntimeError) as exc:
            self.process.stop()
            raise RuntimeError(f"agent did not become healthy: {exc}\n{self.process.log_tail()}") from exc
        return self

    def stop(self) -> int | None:
        return self.process.stop()

    def log(self) -> str:
        return self.process.log_tail(200)


# --- an in-process agent's app on a real port (for CLI tests) ------------------------------------
class ServedApp:
    """Serves an ASGI app with uvicorn on a free loopback port in a thread; ``stop()`` ends it."""

    def __init__(self, app: FastAPI) -> None:
        self.port = free_port()
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServedApp:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise TimeoutError("app server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)


def wait_until(check: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    """Poll ``check`` every 20 ms; AssertionError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout} s")
        time.sleep(0.02)
