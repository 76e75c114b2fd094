"""Typed messages that cross the MQTT boundary between agents and the hub.

Each message is a ``shared.codec`` frame: the pydantic model below travels as the frame's JSON
metadata and the tensor as raw bytes. Both sides use these functions; nothing else builds payloads.
"""

from __future__ import annotations

import time
from enum import IntEnum
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.codec import CodecError, decode_frame, encode_frame

__all__ = [
    "MessageKind",
    "EscalationRequest",
    "EscalationAnswer",
    "DeviceStatus",
    "Assignment",
    "Telemetry",
    "ModelHealth",
    "encode_request",
    "decode_request",
    "encode_answer",
    "decode_answer",
]


class MessageKind(IntEnum):
    ESCALATE = 1
    ANSWER = 2


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EscalationRequest(_Wire):
    """Agent -> hub: a case the edge model was not sure of.

    ``request_id`` is also the MQTT Correlation Data and the idempotency key.
    """

    request_id: str = Field(min_length=1, max_length=128)
    device_id: str = Field(min_length=1, max_length=128)
    region: str = Field(default="", max_length=128)
    task: str = Field(min_length=1, max_length=128)
    model_name: str = Field(default="", max_length=128)
    model_version: str = Field(default="", max_length=128)
    edge_label: int | None = None
    edge_confidence: float | None = None
    sent_at: float = Field(default_factory=time.time)
    # Already redacted at the edge: only what the site allows to leave.
    metadata: dict[str, str] = Field(default_factory=dict)


class EscalationAnswer(_Wire):
    """Hub -> agent: the full model's answer, or an error that says what was wrong."""

    request_id: str
    ok: bool
    label: int | None = None
    confidence: float | None = None
    error: str | None = None
    error_kind: str | None = None
    model_name: str = ""
    model_version: str = ""
    inference_ms: float = 0.0
    worker: str = ""


class DeviceStatus(_Wire):
    """Retained on ``edgefed/v1/{device_id}/status``; the Last Will carries state='offline'."""

    device_id: str
    state: Literal["online", "offline"]
    region: str = ""
    model_name: str = ""
    model_version: str = ""
    at: float = Field(default_factory=time.time)
    # Why the last assigned bundle was refused (verification or load failed); empty when none was.
    last_error: str = ""


class Assignment(_Wire):
    """Retained on ``edgefed/v1/{device_id}/assignment``: the version this device must run."""

    model_name: str
    version: str


class ModelHealth(_Wire):
    """Counters of the model being served, since it started serving here (reset by every swap).

    The hub's rollout gates compare these between devices on a new version and devices still on the
    previous one. ``agreed`` counts escalated cases whose cloud answer has the edge model's label;
    ``errors`` counts cases the model failed to run on (not bad input); ``since`` is the agent's clock.
    """

    version: str = ""
    since: float = 0.0
    requests: int = 0
    errors: int = 0
    escalated: int = 0
    cloud_answers: int = 0
    agreed: int = 0
    local_p99_ms: float | None = None


class Telemetry(_Wire):
    """Agent -> hub on ``edgefed/v1/{device_id}/telemetry`` (QoS 0, periodic): counters since start.

    Latencies are percentiles (``p50``, ``p90``, ``p99``, milliseconds) over recent cases; None while
    there were none. ``breaker`` is the escalation circuit breaker's state.
    """

    device_id: str
    region: str = ""
    model_name: str = ""
    model_version: str = ""
    policy: str = ""
    requests: int = 0
    edge: int = 0
    cloud: int = 0
    fallback: int = 0
    escalations_sent: int = 0
    escalation_timeouts: int = 0
    late_answers: int = 0
    duplicate_answers: int = 0
    outbox_depth: int = 0
    outbox_evicted: int = 0
    breaker: Literal["closed", "open", "half-open"] = "closed"
    local_latency_ms: dict[str, float | None] = Field(default_factory=dict)
    cloud_latency_ms: dict[str, float | None] = Field(default_factory=dict)
    learning_cases: int = 0
    uptime_s: float = 0.0
    at: float = Field(default_factory=time.time)
    # Added for rollout gates; older agents omit them.
    current_model: ModelHealth | None = None
    update_error: str = Field(default="", max_length=2000)


def encode_request(req: EscalationRequest, tensor: np.ndarray) -> bytes:
    """Encode an escalation with the tensor the edge model consumed."""
    return encode_frame(MessageKind.ESCALATE, req.model_dump(mode="json"), tensor)


def decode_request(payload: bytes) -> tuple[EscalationRequest, np.ndarray]:
    """Decode an escalation; raises ``CodecError`` naming the problem."""
    frame = decode_frame(payload)
    if frame.kind != MessageKind.ESCALATE:
        raise CodecError(f"expected an escalation frame (kind {int(MessageKind.ESCALATE)}), got kind {frame.kind}")
    if frame.tensor is None:
        raise CodecError("escalation carries no tensor")
    try:
        req = EscalationRequest.model_validate(frame.meta)
    except ValidationError as exc:
        raise CodecError(f"escalation metadata is invalid: {_first_error(exc)}") from None
    return req, frame.tensor


def encode_answer(answer: EscalationAnswer, probs: np.ndarray | None = None) -> bytes:
    """Encode an answer; ``probs`` are the full model's class probabilities (float32)."""
    tensor = None if probs is None else np.asarray(probs, dtype=np.float32)
    return encode_frame(MessageKind.ANSWER, answer.model_dump(mode="json"), tensor)


def decode_answer(payload: bytes) -> tuple[EscalationAnswer, np.ndarray | None]:
    """Decode an answer; raises ``CodecError`` naming the problem."""
    frame = decode_frame(payload)
    if frame.kind != MessageKind.ANSWER:
        raise CodecError(f"expected an answer frame (kind {int(MessageKind.ANSWER)}), got kind {frame.kind}")
    try:
        answer = EscalationAnswer.model_validate(frame.meta)
    except ValidationError as exc:
        raise CodecError(f"answer metadata is invalid: {_first_error(exc)}") from None
    return answer, frame.tensor


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "(root)"
    return f"{loc}: {err['msg']}"
