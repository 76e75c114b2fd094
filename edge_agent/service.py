"""The agent core: one case in, one typed answer out.

``infer`` runs the edge model, asks the policy whether to escalate, and if so waits (bounded) for
the hub. Whatever happens on the network, the caller gets an answer: the hub's (``cloud``), the
edge model's (``edge``), or the edge model's because the hub did not answer usably in time
(``edge-fallback``, with the reason).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel

from edge_agent.escalation import CloudAnswer, EscalationClient
from edge_agent.outbox import Outbox
from edge_agent.policy import Policy
from edge_agent.runtime import EdgeRuntime, InputError
from shared.codec import CodecError
from shared.data.preprocess import decode_image, to_model_input
from shared.messages import EscalationRequest, encode_request

__all__ = ["AnswerSource", "EdgeService", "InferenceResult", "ServiceStats"]

log = logging.getLogger(__name__)

AnswerSource = Literal["edge", "cloud", "edge-fallback"]


class InferenceResult(BaseModel):
    """The answer to one case, as returned by ``POST /v1/infer``."""

    request_id: str
    label: int
    label_name: str
    confidence: float | None
    probabilities: list[float] | None
    source: AnswerSource
    escalated: bool
    model_name: str
    model_version: str
    latency_ms: float
    edge_label: int
    edge_confidence: float
    cloud_model: str | None = None
    fallback_reason: str | None = None
    # True when the hub did not answer and the case waits in the durable outbox to be sent later.
    queued: bool = False


@dataclass
class ServiceStats:
    requests: int = 0
    edge: int = 0
    cloud: int = 0
    fallback: int = 0


class EdgeService:
    """Edge inference with escalation; ``swap`` replaces the model without failing requests in flight."""

    def __init__(
        self,
        runtime: EdgeRuntime,
        policy: Policy,
        escalator: EscalationClient | None,
        *,
        device_id: str,
        region: str = "",
        escalation_timeout_s: float = 1.0,
        outbox: Outbox | None = None,
    ) -> None:
        self._runtime = runtime
        self.policy = policy
        self.escalator = escalator
        self.device_id = device_id
        self.region = region
        self.escalation_timeout_s = escalation_timeout_s
        self.outbox = outbox
        self._stats = ServiceStats()

    @property
    def runtime(self) -> EdgeRuntime:
        return self._runtime

    def swap(self, runtime: EdgeRuntime) -> None:
        """Serve ``runtime`` from now on; requests already running finish on the old one."""
        old = self._runtime
        self._runtime = runtime
        log.info("now serving %s:%s (was %s:%s)", runtime.name, runtime.version, old.name, old.version)

    def stats(self) -> ServiceStats:
        return ServiceStats(**asdict(self._stats))

    def image_to_tensor(self, data: bytes, runtime: EdgeRuntime | None = None) -> np.ndarray:
        """PNG/JPEG bytes to the model's 1×C×H×W input; InputError names what is wrong with the image."""
        spec = (runtime or self._runtime).spec
        try:
            return to_model_input(decode_image(data, spec), spec)
        except ValueError as exc:  # ImageDecodeError is a ValueError
            raise InputError(str(exc)) from None

    async def infer_image(self, data: bytes) -> InferenceResult:
        """Decode and preprocess an image off the event loop, then ``infer`` it."""
        started = time.perf_counter()
        runtime = self._runtime  # one model for the whole request, even if swap() happens meanwhile
        tensor = await asyncio.to_thread(self.image_to_tensor, data, runtime)
        return await self._infer(runtime, tensor, started)

    async def infer(self, tensor: np.ndarray) -> InferenceResult:
        """Answer one case (a 1×C×H×W tensor); InputError if it does not match the model's input."""
        return await self._infer(self._runtime, tensor, time.perf_counter())

    async def _infer(self, runtime: EdgeRuntime, tensor: np.ndarray, started: float) -> InferenceResult:
        x = runtime.validate(tensor)
        if x.shape[0] != 1:
            raise InputError(f"infer answers one case at a time; the input batch size is {x.shape[0]}, use 1")
        probs = (await asyncio.to_thread(runtime.predict, x))[0]
        edge_label = int(np.argmax(probs))
        edge_conf = float(probs[edge_label])
        request_id = uuid.uuid4().hex
        self._stats.requests += 1

        def result(**kw: object) -> InferenceResult:
            base: dict[str, object] = dict(
                request_id=request_id,
                label=edge_label,
                label_name=runtime.labels[edge_label],
                confidence=edge_conf,
                probabilities=[float(p) for p in probs],
                source="edge",
                escalated=False,
                model_name=runtime.name,
                model_version=runtime.version,
                edge_label=edge_label,
                edge_confidence=edge_conf,
            )
            base.update(kw)
            return InferenceResult(latency_ms=(time.perf_counter() - started) * 1000.0, **base)  # type: ignore[arg-type]

        if not self.policy.should_escalate(probs):
            self._stats.edge += 1
            return result()
        reason, cloud, queued = await self._escalate(runtime, request_id, x, edge_label, edge_conf)
        if cloud is None:
            self._stats.fallback += 1
            return result(source="edge-fallback", escalated=True, fallback_reason=reason, queued=queued)
        self._stats.cloud += 1
        return result(**cloud, source="cloud", escalated=True)

    async def _escalate(
        self, runtime: EdgeRuntime, request_id: str, x: np.ndarray, edge_label: int, edge_conf: float
    ) -> tuple[str | None, dict[str, object] | None, bool]:
        """(None, fields of the cloud answer, False) or (why we fall back, None, whether it was queued)."""
        if self.escalator is None:
            return "escalation is not configured", None, False
        req = EscalationRequest(
            request_id=request_id,
            device_id=self.device_id,
            region=self.region,
            task=runtime.manifest.task,
            model_name=runtime.name,
            model_version=runtime.version,
            edge_label=edge_label,
            edge_confidence=edge_conf,
        )
        try:
            payload = encode_request(req, x)
        except CodecError as exc:
            return f"case cannot be encoded for the hub: {exc}", None, False
        if not self.escalator.connected:
            return "broker not connected", None, self._queue(request_id, payload)
        answer = await self.escalator.send(request_id, payload, self.escalation_timeout_s)
        if answer is None:
            reason = f"no answer from the hub within {self.escalation_timeout_s:g} s"
            return reason, None, self._queue(request_id, payload)
        reason, fields = _cloud_fields(answer, runtime.labels)
        return reason, fields, False

    def _queue(self, request_id: str, payload: bytes) -> bool:
        """Keep an unanswered case for a later re-send; True if it was queued."""
        if self.outbox is None:
            return False
        # One SQLite insert (WAL, no fsync per commit): short enough to do on the event loop.
        self.outbox.put(request_id, payload)
        return True


def _cloud_fields(cloud: CloudAnswer, labels: list[str]) -> tuple[str | None, dict[str, object] | None]:
    a = cloud.answer
    if not a.ok:
        log.warning("hub answered escalation %s with an error (%s): %s", a.request_id, a.error_kind, a.error)
        return f"hub error: {a.error_kind or 'error'}: {a.error or 'no detail'}", None
    if a.label is None or not 0 <= a.label < len(labels):
        log.warning(
            "hub answered escalation %s with label %r outside 0..%d", a.request_id, a.label, len(labels) - 1
        )
        return f"hub answered label {a.label!r}, which this model's {len(labels)} labels do not have", None
    probs: list[float] | None = None
    if cloud.probabilities is not None:
        p = np.asarray(cloud.probabilities, dtype=np.float64).reshape(-1)
        if p.size == len(labels) and np.isfinite(p).all():
            probs = [float(v) for v in p]
    confidence = a.confidence if a.confidence is not None and math.isfinite(a.confidence) else None
    if confidence is None and probs is not None:
        confidence = probs[a.label]
    cloud_model = f"{a.model_name}:{a.model_version}" if a.model_name else None
    return None, dict(
        label=a.label,
        label_name=labels[a.label],
        confidence=confidence,
        probabilities=probs,
        cloud_model=cloud_model,
    )
