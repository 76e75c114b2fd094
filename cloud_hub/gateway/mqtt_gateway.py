"""Escalations over MQTT: decode, check, hand to inference, answer to the Response Topic.

paho's network thread decodes and queues; the answer is published from the inference worker's
completion callback (``MqttClient.publish`` is thread-safe), so a busy model never stalls the
connection. A lone escalation (no more input waiting on the connection) that finds the model idle
(nothing queued, no batch running) runs at once on the network thread instead, which spares it two
thread hand-offs.

Every refused escalation gets an error answer naming the problem when there is a
Response Topic to send it to, is counted by kind, and is logged in one line. Outcomes (answered with
latency, or error) go to the activity buffer for per-device/per-version statistics; raw payloads are
stored only while an admin has payload storage enabled (``cloud_hub.escalations``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import partial
from typing import TypeVar

import numpy as np
from pydantic import ValidationError

from cloud_hub.errors import HubServiceError
from cloud_hub.gateway.activity import DeviceActivity
from cloud_hub.inference import InferenceService, Prediction
from cloud_hub.metrics import HubMetrics
from shared import topics
from shared.codec import MAX_FRAME_BYTES, CodecError
from shared.logs import request_context
from shared.messages import (
    DeviceStatus,
    EscalationAnswer,
    EscalationRequest,
    Telemetry,
    decode_request,
    encode_answer,
)
from shared.mqtt import Message, MqttClient, MqttError

__all__ = ["MqttGateway", "STATUS_SUBSCRIPTION"]

log = logging.getLogger(__name__)

STATUS_SUBSCRIPTION = f"{topics.PREFIX}/+/status"


class _Refused(Exception):
    def __init__(self, kind: str, error: str) -> None:
        super().__init__(error)
        self.kind = kind


class MqttGateway:
    """Connects to the broker on ``start()``; the constructor does no I/O."""

    def __init__(
        self,
        broker_url: str,
        worker_id: str,
        inference: InferenceService,
        activity: DeviceActivity,
        metrics: HubMetrics,
        *,
        username: str | None = None,
        password: str | None = None,
        ca_file: str | None = None,
        max_payload_bytes: int = MAX_FRAME_BYTES,
    ) -> None:
        self.broker_url = broker_url
        self.max_payload_bytes = max_payload_bytes
        self._last_escalation = 0.0  # monotonic time of the last escalation received
        self.worker_id = worker_id
        self._inference = inference
        self._activity = activity
        self._metrics = metrics
        self._username, self._password, self._ca_file = username, password, ca_file
        self._client: MqttClient | None = None
        self._telemetry_sink: Callable[[str, Telemetry], None] | None = None
        self._connect_hooks: list[Callable[[], None]] = []

    def set_telemetry_sink(self, sink: Callable[[str, Telemetry], None]) -> None:
        """Before ``start()``: hand each valid telemetry message to ``sink(device_id, telemetry)``
        (paho thread; one hub worker of the shared subscription gets each message)."""
        self._telemetry_sink = sink

    def add_connect_hook(self, hook: Callable[[], None]) -> None:
        """Before ``start()``: run ``hook`` (paho thread, must be quick) after every (re)connection."""
        self._connect_hooks.append(hook)

    def publish_retained(self, topic: str, payload: bytes) -> bool:
        """Publish a retained QoS 1 message (device assignments); False when not connected or refused."""
        client = self._client
        if client is None or not client.connected:
            return False
        try:
            client.publish(topic, payload, qos=1, retain=True)
            return True
        except MqttError as exc:
            log.warning("could not publish retained %s: %s", topic, exc)
            return False

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Start connecting in the background; the hub serves (and readyz says 'broker') until connected."""
        client = MqttClient(
            self.broker_url,
            self.worker_id,
            username=self._username,
            password=self._password,
            ca_file=self._ca_file,
        )
        client.subscribe(topics.hub_escalate_subscription(), self._on_escalation, qos=1)
        client.subscribe(STATUS_SUBSCRIPTION, self._on_status, qos=1)
        if self._telemetry_sink is not None:
            client.subscribe(topics.hub_telemetry_subscription(), self._on_telemetry, qos=0)
        for hook in self._connect_hooks:
            client.on_connect(hook)
        client.on_connect(lambda: log.info("connected to broker %s as %s", self.broker_url, self.worker_id))
        client.start(wait=None)
        self._client = client

    def pause(self, quiet_s: float = 0.3, timeout: float = 5.0) -> None:
        """Leave the shared subscription so the broker sends new escalations to the other workers,
        then wait until none arrived for ``quiet_s`` (what the broker had already queued for us is
        still answered). Part of a graceful stop: pause, drain inference, stop."""
        client = self._client
        if client is None:
            return
        try:
            acked = client.unsubscribe(topics.hub_escalate_subscription(), wait=timeout)
        except MqttError as exc:
            log.warning("could not leave the shared subscription: %s", exc)
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and time.monotonic() - self._last_escalation < quiet_s:
            time.sleep(0.05)
        log.info("left the shared subscription%s", "" if acked else " (no acknowledgement from the broker)")

    def stop(self) -> None:
        if self._client is not None:
            self._client.stop()
            self._client = None

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.connected

    # --- escalations -----------------------------------------------------------------------
    def _on_escalation(self, msg: Message) -> None:
        self._last_escalation = time.monotonic()
        self._metrics.escalations_received.inc()
        corr = msg.correlation_data
        request_id = corr.decode("utf-8", "replace")[:128] if corr else ""
        with request_context(request_id):
            self._handle_escalation(msg, corr, request_id)

    def _handle_escalation(self, msg: Message, corr: bytes | None, request_id: str) -> None:
        received = time.monotonic()
        try:
            device_id = topics.device_from_topic(msg.topic)
        except ValueError as exc:
            self._refuse(None, corr, request_id, "bad_topic", str(exc), msg.topic)
            return
        response_topic = msg.response_topic
        # Answers go only below the sender's own subtree, so a device cannot make the hub publish
        # into another device's topics.
        if response_topic is None or not response_topic.startswith(f"{topics.PREFIX}/{device_id}/"):
            kind = "no_response_topic" if response_topic is None else "bad_response_topic"
            self._refuse(
                None,
                corr,
                request_id,
                kind,
                f"response topic {response_topic!r} is not below {topics.PREFIX}/{device_id}/",
                msg.topic,
            )
            return
        self._activity.escalation(device_id)
        if len(msg.payload) > self.max_payload_bytes:
            error = f"escalation payload is {len(msg.payload)} bytes; the limit is {self.max_payload_bytes}"
            self._refuse(response_topic, corr, request_id, "oversized", error, msg.topic)
            return
        try:
            req, tensor = self._decode(msg.payload, device_id)
        except _Refused as exc:
            self._refuse(response_topic, corr, request_id, exc.kind, str(exc), msg.topic)
            return
        corr = corr or req.request_id.encode()  # the request id is the correlation data by contract
        # Errors keep their kind in the answer and the metric: queue_full (backpressure, refused at
        # once), deadline_exceeded (waited past the hub's request deadline, never computed),
        # inference_failed, unknown_task, bad_shape/bad_dtype (cloud_hub.inference.batcher).
        try:
            # A lone escalation (no more input waiting) that finds the model idle runs here on the
            # network thread, and its answer is written by this thread without a wake-up: two thread
            # hand-offs fewer. In a burst, escalations queue for the worker and are batched.
            client = self._client
            self._inference.submit_callback(
                req.task,
                tensor,
                partial(self._on_done, req, response_topic, corr, received, msg.payload),
                inline_when_idle=client is not None and not client.input_waiting(),
            )
        except HubServiceError as exc:
            self._refuse(response_topic, corr, req.request_id, exc.kind, str(exc), msg.topic, req=req)

    @staticmethod
    def _decode(payload: bytes, device_id: str) -> tuple[EscalationRequest, np.ndarray]:
        try:
            req, tensor = decode_request(payload)
        except CodecError as exc:
            raise _Refused("bad_payload", f"escalation payload refused: {exc}") from None
        if req.device_id != device_id:
            raise _Refused(
                "device_mismatch",
                f"request names device {req.device_id!r} but was published on {topics.escalate(device_id)}",
            )
        if tensor.ndim == 4 and tensor.shape[0] != 1:
            raise _Refused("bad_shape", f"an escalation carries one sample; this one has {tensor.shape[0]}")
        return req, tensor

    def _on_done(
        self,
        req: EscalationRequest,
        response_topic: str,
        corr: bytes,
        received: float,
        payload: bytes,
        outcome: Prediction | BaseException,
    ) -> None:
        # Runs on the inference thread: carry the escalation's id into its log records there too.
        with request_context(req.request_id):
            self._answer(req, response_topic, corr, outcome, received, payload)

    def _answer(
        self,
        req: EscalationRequest,
        response_topic: str,
        corr: bytes,
        pred: Prediction | BaseException,
        received: float,
        payload: bytes,
    ) -> None:
        if isinstance(pred, HubServiceError):
            self._refuse(
                response_topic, corr, req.request_id, pred.kind, str(pred), topics.escalate(req.device_id), req=req
            )
            return
        if isinstance(pred, BaseException):  # reported to the agent and counted, never raised here
            self._refuse(
                response_topic,
                corr,
                req.request_id,
                "inference_failed",
                f"inference failed: {pred}",
                topics.escalate(req.device_id),
                req=req,
            )
            return
        answer = EscalationAnswer(
            request_id=req.request_id,
            ok=True,
            label=pred.label_ids[0],
            confidence=pred.confidences[0],
            model_name=pred.model_name,
            model_version=pred.model_version,
            inference_ms=round(pred.inference_ms, 3),
            worker=self.worker_id,
        )
        if self._publish(response_topic, encode_answer(answer, pred.probabilities[0]), corr):
            self._metrics.escalations_answered.labels(pred.task).inc()
            latency_ms = (time.monotonic() - received) * 1000.0
            self._activity.answered(req, latency_ms, payload, answer.label, answer.confidence)
        else:
            self._activity.failed(req.device_id, req)
            log.debug("answered escalation from %s with %s:%s", req.device_id, pred.model_name, pred.model_version)

    def _refuse(
        self,
        response_topic: str | None,
        corr: bytes | None,
        request_id: str,
        kind: str,
        error: str,
        topic: str,
        *,
        req: EscalationRequest | None = None,
    ) -> None:
        self._metrics.escalation_errors.labels(kind).inc()
        try:
            self._activity.failed(topics.device_from_topic(topic), req)
        except ValueError:  # not below a device's topics: nobody to count it for
            pass
        log.warning("escalation on %s refused (%s): %s", topic, kind, error)
        if response_topic is None:
            return
        answer = EscalationAnswer(
            request_id=request_id, ok=False, error=error, error_kind=kind, worker=self.worker_id
        )
        self._publish(response_topic, encode_answer(answer), corr)

    def _publish(self, topic: str, payload: bytes, corr: bytes | None) -> bool:
        client = self._client
        try:
            if client is None:
                raise MqttError("gateway is stopped")
            client.publish(topic, payload, qos=1, correlation_data=corr)
            return True
        except MqttError as exc:
            self._metrics.escalation_errors.labels("publish_failed").inc()
            log.warning("could not publish answer to %s: %s", topic, exc)
            return False

    # --- device status ---------------------------------------------------------------------
    def _on_status(self, msg: Message) -> None:
        parsed = _device_message(msg, DeviceStatus, "status")  # None also for a cleared retained status
        if parsed is None:
            return
        device_id, status = parsed
        # The device's clock may run ahead; never record a last_seen in the future.
        self._activity.status(device_id, status.state == "online", min(status.at, time.time()))

    # --- telemetry -------------------------------------------------------------------------
    def _on_telemetry(self, msg: Message) -> None:
        sink = self._telemetry_sink
        parsed = _device_message(msg, Telemetry, "telemetry") if sink is not None else None
        if parsed is not None:
            sink(*parsed)


_M = TypeVar("_M", DeviceStatus, Telemetry)


def _device_message(msg: Message, model: type[_M], what: str) -> tuple[str, _M] | None:
    """A device's status or telemetry message as (device id, message); None (logged) if empty,
    malformed, or naming another device than its topic."""
    if not msg.payload:
        return None
    try:
        device_id = topics.device_from_topic(msg.topic)
        parsed = model.model_validate_json(msg.payload)
    except (ValueError, ValidationError) as exc:
        log.warning("ignoring malformed %s on %s: %s", what, msg.topic, str(exc).splitlines()[0])
        return None
    if parsed.device_id != device_id:
        log.warning("ignoring %s on %s that names device %r", what, msg.topic, parsed.device_id)
        return None
    return device_id, parsed
