"""The agent core: one case in, one typed answer out.

``infer`` runs the edge model, asks the policy whether to escalate, and if so waits (bounded) for
the hub. Whatever happens on the network, the caller gets an answer: the hub's (``cloud``), the
edge model's (``edge``), or the edge model's because the hub did not answer usably in time
(``edge-fallback``, with the reason). While the circuit breaker is open, escalations are not even
tried: the case is answered at the edge and queued for later.

Escalated cases go to the learning store with the hub's answer when it comes (now, or later through
the outbox: ``apply_late``), and recent cases stay in memory so an inspector's label (``feedback``)
can be kept with its input. Metadata is redacted once, here, before it is stored or sent.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel

from edge_agent.breaker import CircuitBreaker
from edge_agent.budget import BudgetPolicy
from edge_agent.escalation import CloudAnswer, EscalationClient
from edge_agent.latency import LatencyWindow
from edge_agent.learning_store import LearningStore
from edge_agent.model_health import ModelHealthCounter
from edge_agent.outbox import Outbox
from edge_agent.policy import Policy
from edge_agent.redaction import Redactor, validate_metadata
from edge_agent.runtime import EdgeRuntime, InputError
from shared.codec import CodecError
from shared.data.preprocess import decode_image, to_model_input
from shared.messages import EscalationRequest, decode_request, encode_request

__all__ = ["AnswerSource", "EdgeService", "FeedbackError", "InferenceResult", "ServiceStats"]

log = logging.getLogger(__name__)

AnswerSource = Literal["edge", "cloud", "edge-fallback"]


class FeedbackError(LookupError):
    """Feedback names a case this agent no longer knows, or a label the model does not have."""


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
    short_circuited: int = 0  # escalations held back by the open circuit breaker
    late_applied: int = 0  # cloud answers that came after the caller had the edge's answer
    feedback: int = 0


@dataclass(frozen=True)
class _Recent:
    tensor: np.ndarray
    task: str
    model_name: str
    model_version: str
    edge_label: int
    edge_confidence: float
    metadata: dict[str, str]


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
        breaker: CircuitBreaker | None = None,
        redactor: Redactor | None = None,
        learning: LearningStore | None = None,
        recent_cases: int = 512,
        recent_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        self._runtime = runtime
        self.policy = policy
        self.escalator = escalator
        self.device_id = device_id
        self.region = region
        self.escalation_timeout_s = escalation_timeout_s
        self.outbox = outbox
        self.breaker = breaker
        self.redactor = redactor
        self.learning = learning
        self.local_latency = LatencyWindow()
        self.cloud_latency = LatencyWindow()
        # Counters of the served version only (rollout gates); replaced on every swap.
        self.model_health = ModelHealthCounter(runtime.version)
        self._recent: OrderedDict[str, _Recent] = OrderedDict()
        self._recent_max = recent_cases
        # Inputs kept for feedback are bounded in bytes too: 512 cases of a 3x224x224 model would be 300 MB.
        self._recent_max_bytes = recent_bytes
        self._recent_bytes = 0
        self._stats = ServiceStats()
        # Why the last model update was refused (shown in /healthz and the retained status).
        self.update_error: str | None = None

    @property
    def runtime(self) -> EdgeRuntime:
        return self._runtime

    def swap(self, runtime: EdgeRuntime) -> None:
        """Serve ``runtime`` from now on; requests already running finish on the old one."""
        old = self._runtime
        self.model_health = ModelHealthCounter(runtime.version)
        self._runtime = runtime
        if isinstance(self.policy, BudgetPolicy):
            self.policy.calibrate(runtime.manifest.metrics)
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

    def redact(self, metadata: object | None) -> dict[str, str]:
        """Validate a client's metadata and apply the site's redaction rules (RedactionError if invalid)."""
        if metadata is None:
            return {}
        clean = validate_metadata(metadata)
        return self.redactor.apply(clean) if self.redactor is not None else clean

    async def infer_image(self, data: bytes, metadata: object | None = None) -> InferenceResult:
        """Decode and preprocess an image off the event loop, then ``infer`` it."""
        started = time.perf_counter()
        meta = self.redact(metadata)
        runtime = self._runtime  # one model for the whole request, even if swap() happens meanwhile
        tensor = await asyncio.to_thread(self.image_to_tensor, data, runtime)
        return await self._infer(runtime, tensor, started, meta)

    async def infer(self, tensor: np.ndarray, metadata: object | None = None) -> InferenceResult:
        """Answer one case (a 1×C×H×W tensor); InputError if it does not match the model's input."""
        started = time.perf_counter()
        return await self._infer(self._runtime, tensor, started, self.redact(metadata))

    async def _infer(
        self, runtime: EdgeRuntime, tensor: np.ndarray, started: float, meta: dict[str, str]
    ) -> InferenceResult:
        x = runtime.validate(tensor)
        if x.shape[0] != 1:
            raise InputError(f"infer answers one case at a time; the input batch size is {x.shape[0]}, use 1")
        health = self.model_health
        t0 = time.perf_counter()
        try:
            probs = (await asyncio.to_thread(runtime.predict, x))[0]
        except Exception:
            health.failed()
            raise
        self.local_latency.add((time.perf_counter() - t0) * 1000.0)
        health.answered_locally((time.perf_counter() - t0) * 1000.0)
        edge_label = int(np.argmax(probs))
        edge_conf = float(probs[edge_label])
        request_id = uuid.uuid4().hex
        self._stats.requests += 1
        self._remember(
            request_id, _Recent(x, runtime.manifest.task, runtime.name, runtime.version, edge_label, edge_conf, meta)
        )

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
        self._keep_for_learning(request_id)
        health.escalated()
        reason, cloud, queued = await self._escalate(runtime, request_id, x, edge_label, edge_conf, meta)
        if cloud is None:
            self._stats.fallback += 1
            return result(source="edge-fallback", escalated=True, fallback_reason=reason, queued=queued)
        self._stats.cloud += 1
        health.cloud_answered(cloud["label"] == edge_label)
        return result(**cloud, source="cloud", escalated=True)

    async def _escalate(
        self,
        runtime: EdgeRuntime,
        request_id: str,
        x: np.ndarray,
        edge_label: int,
        edge_conf: float,
        meta: dict[str, str],
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
            metadata=meta,
        )
        try:
            payload = encode_request(req, x)
        except CodecError as exc:
            return f"case cannot be encoded for the hub: {exc}", None, False
        if not self.escalator.connected:
            return "broker not connected", None, self._queue(request_id, payload)
        if self.breaker is not None and not self.breaker.allow():
            self._stats.short_circuited += 1
            return "escalation circuit open (the hub was failing)", None, self._queue(request_id, payload)
        answer = await self.escalator.send(request_id, payload, self.escalation_timeout_s)
        if self.breaker is not None:
            self.breaker.record(answer is not None, answer.round_trip_ms if answer else None)
        if answer is None:
            reason = f"no answer from the hub within {self.escalation_timeout_s:g} s"
            return reason, None, self._queue(request_id, payload)
        self.cloud_latency.add(answer.round_trip_ms)
        reason, fields = _cloud_fields(answer, runtime.labels)
        if fields is not None:
            self._learn_cloud(request_id, answer)
        return reason, fields, False

    def _queue(self, request_id: str, payload: bytes) -> bool:
        """Keep an unanswered case for a later re-send; True if it was queued."""
        if self.outbox is None:
            return False
        # One SQLite insert (WAL, no fsync per commit): short enough to do on the event loop.
        self.outbox.put(request_id, payload)
        return True

    # --- answers that come after the caller was answered, and inspectors' labels ---------------
    def apply_late(self, payload: bytes, answer: CloudAnswer) -> None:
        """A queued case's answer arrived (the outbox already removed it: this runs once per case).

        ``payload`` is the queued request, so the case can be stored even after an agent restart.
        """
        self._stats.late_applied += 1
        if answer.round_trip_ms > 0:  # an answer that arrived unawaited has no measured round trip
            self.cloud_latency.add(answer.round_trip_ms)
        if self.learning is None or not answer.answer.ok or answer.answer.label is None:
            return
        rid = answer.answer.request_id
        if self.learning.get(rid) is None:
            try:
                req, tensor = decode_request(payload)
            except CodecError as exc:
                log.warning("queued case %s cannot be decoded for the learning store: %s", rid, exc)
                return
            self.learning.record_case(
                rid,
                tensor,
                task=req.task,
                model_name=req.model_name,
                model_version=req.model_version,
                edge_label=req.edge_label,
                edge_confidence=req.edge_confidence,
                metadata=req.metadata,
            )
        self._learn_cloud(rid, answer)

    def feedback(self, request_id: str, label: int | str) -> int:
        """Keep an inspector's label for a recent or escalated case; returns the label index."""
        runtime = self._runtime
        if isinstance(label, str):
            if label not in runtime.labels:
                raise FeedbackError(f"label {label!r} is not one of the model's labels {runtime.labels}")
            index = runtime.labels.index(label)
        else:
            index = int(label)
            if not 0 <= index < len(runtime.labels):
                raise FeedbackError(f"label {index} is outside 0..{len(runtime.labels) - 1}")
        if self.learning is None:
            raise FeedbackError("the learning store is disabled on this agent; feedback is not kept")
        if self.learning.get(request_id) is None and not self._keep_for_learning(request_id):
            raise FeedbackError(
                f"request {request_id!r} is unknown here: it was never answered by this agent or is too old "
                f"(the last {self._recent_max} cases are kept for feedback)"
            )
        self.learning.confirm(request_id, index)
        self._stats.feedback += 1
        return index

    def _remember(self, request_id: str, case: _Recent) -> None:
        self._recent[request_id] = case
        self._recent_bytes += case.tensor.nbytes
        while len(self._recent) > 1 and (
            len(self._recent) > self._recent_max or self._recent_bytes > self._recent_max_bytes
        ):
            self._recent_bytes -= self._recent.popitem(last=False)[1].tensor.nbytes

    def _keep_for_learning(self, request_id: str) -> bool:
        case = self._recent.get(request_id)
        if self.learning is None or case is None:
            return False
        self.learning.record_case(
            request_id,
            case.tensor,
            task=case.task,
            model_name=case.model_name,
            model_version=case.model_version,
            edge_label=case.edge_label,
            edge_confidence=case.edge_confidence,
            metadata=case.metadata,
        )
        return True

    def _learn_cloud(self, request_id: str, cloud: CloudAnswer) -> None:
        a = cloud.answer
        if self.learning is None or a.label is None:
            return
        model = f"{a.model_name}:{a.model_version}" if a.model_name else None
        self.learning.record_cloud(request_id, a.label, cloud.probabilities, model)


def _cloud_fields(cloud: CloudAnswer, labels: list[str]) -> tuple[str | None, dict[str, object] | None]:
    a = cloud.answer
    if not a.ok:
        log.warning("hub answered escalation %s with an error (%s): %s", a.request_id, a.error_kind, a.error)
        return f"hub error: {a.error_kind or 'error'}: {a.error or 'no detail'}", None
    if a.label is None or not 0 <= a.label < len(labels):
        log.warning("hub answered escalation %s with label %r outside 0..%d", a.request_id, a.label, len(labels) - 1)
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
