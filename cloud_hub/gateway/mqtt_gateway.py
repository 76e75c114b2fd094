"""Escalations over MQTT: decode, check, hand to inference, answer to the Response Topic.

paho's network thread only decodes and queues; the answer is published from the inference worker's
completion callback (``MqttClient.publish`` is thread-safe), so a slow model never stalls the
connection. Every refused escalation gets an error answer naming the problem when there is a
Response Topic to send it to, is counted by kind, and is logged in one line. Payloads are never
stored.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from functools import partial

import numpy as np
from pydantic import ValidationError

from cloud_hub.errors import HubServiceError
from cloud_hub.gateway.activity import DeviceActivity
from cloud_hub.inference import InferenceService, Prediction
from cloud_hub.metrics import HubMetrics
from shared import topics
from shared.codec import CodecError
from shared.messages import DeviceStatus, EscalationAnswer, EscalationRequest, decode_request, encode_answer
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
    ) -> None:
        self.broker_url = broker_url
        self.worker_id = worker_id
        self._inference = inference
        self._activity = activity
        self._metrics = metrics
        self._username, self._password, self._ca_file = username, password, ca_file
        self._client: MqttClient | None = None

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
        client.on_connect(lambda: log.info("connected to broker %s as %s", self.broker_url, self.worker_id))
        client.start(wait=None)
        self._client = client

    def stop(self) -> None:
        if self._client is not None:
            self._client.stop()
            self._client = None

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.connected

    # --- escalations -----------------------------------------------------------------------
    def _on_escalation(self, msg: Message) -> None:
        self._metrics.escalations_received.inc()
        corr = msg.correlation_data
        request_id = corr.decode("utf-8", "replace")[:128] if corr else ""
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
        try:
            req, tensor = self._decode(msg.payload, device_id)
        except _Refused as exc:
            self._refuse(response_topic, corr, request_id, exc.kind, str(exc), msg.topic)
            return
        corr = corr or req.request_id.encode()  # the request id is the correlation data by contract
        try:
            future = self._inference.submit(req.task, tensor)
        except HubServiceError as exc:
            self._refuse(response_topic, corr, req.request_id, exc.kind, str(exc), msg.topic)
            return
        future.add_done_callback(partial(self._on_done, req, response_topic, corr))

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
        self, req: EscalationRequest, response_topic: str, corr: bytes, future: Future[Prediction]
    ) -> None:
        try:
            pred = future.result()
        except HubServiceError as exc:
            self._refuse(
                response_topic, corr, req.request_id, exc.kind, str(exc), topics.escalate(req.device_id)
            )
            return
        except Exception as exc:  # noqa: BLE001 - reported to the agent and counted, never raised here
            self._refuse(
                response_topic,
                corr,
                req.request_id,
                "inference_failed",
                f"inference failed: {exc}",
                topics.escalate(req.device_id),
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

    def _refuse(
        self,
        response_topic: str | None,
        corr: bytes | None,
        request_id: str,
        kind: str,
        error: str,
        topic: str,
    ) -> None:
        self._metrics.escalation_errors.labels(kind).inc()
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
        if not msg.payload:  # a cleared retained status
            return
        try:
            device_id = topics.device_from_topic(msg.topic)
            status = DeviceStatus.model_validate_json(msg.payload)
        except (ValueError, ValidationError) as exc:
            log.warning("ignoring malformed status on %s: %s", msg.topic, str(exc).splitlines()[0])
            return
        if status.device_id != device_id:
            log.warning("ignoring status on %s that names device %r", msg.topic, status.device_id)
            return
        # The device's clock may run ahead; never record a last_seen in the future.
        self._activity.status(device_id, status.state == "online", min(status.at, time.time()))
