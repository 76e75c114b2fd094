"""MQTT v5 request/response: send an unsure case to the hub and wait, bounded, for its answer.

A request goes to ``edgefed/v1/{device}/escalate`` (QoS 1) with Response Topic
``edgefed/v1/{device}/answer`` and Correlation Data = the request id. Each waiting request is an
asyncio Future keyed by request id; paho's network thread resolves it through
``loop.call_soon_threadsafe``. The waiter removes its own entry in ``finally``, so a request whose
answer never comes (hub down, message lost, broker gone) leaves nothing behind.

Answers that match no waiting request are counted, never applied: ``late`` (we had given up),
``duplicates`` (already answered: QoS 1 may deliver twice), ``unknown`` (never ours). Payloads that
do not decode are counted as ``malformed`` and logged; none of this can raise into paho's thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from shared import topics
from shared.codec import CodecError
from shared.messages import EscalationAnswer, EscalationRequest, decode_answer, encode_request
from shared.mqtt import Message, MqttClient, MqttError

__all__ = ["CloudAnswer", "EscalationClient", "EscalationStats"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CloudAnswer:
    """The hub's answer to one escalation, with its class probabilities when it sent them."""

    answer: EscalationAnswer
    probabilities: np.ndarray | None
    round_trip_ms: float


@dataclass
class EscalationStats:
    """Counters since start; read with ``EscalationClient.stats()`` (a consistent copy)."""

    sent: int = 0
    answered: int = 0
    error_answers: int = 0
    timeouts: int = 0
    not_sent: int = 0
    late: int = 0
    duplicates: int = 0
    unknown: int = 0
    malformed: int = 0


class EscalationClient:
    """Escalations for one device over an ``MqttClient`` that the caller starts and stops."""

    def __init__(self, mqtt: MqttClient, device_id: str, *, remember: int = 4096) -> None:
        self._mqtt = mqtt
        self.device_id = topics.validate_device_id(device_id)
        self.request_topic = topics.escalate(device_id)
        self.answer_topic = topics.answer(device_id)
        self._lock = threading.Lock()
        self._pending: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Future[CloudAnswer], float]] = {}
        # Outcome of recently finished requests, to tell a late or duplicate answer from a stranger's.
        self._recent: OrderedDict[str, str] = OrderedDict()
        self._remember = remember
        self._stats = EscalationStats()
        # Called (on paho's thread) with answers that came after their waiter gave up, or for ids
        # this process never sent (e.g. re-sent after a restart): the outbox decides if they apply.
        self.on_unmatched: Callable[[CloudAnswer], None] | None = None

    def subscribe(self) -> None:
        """Listen on this device's answer topic (the MqttClient re-subscribes after reconnects)."""
        self._mqtt.subscribe(self.answer_topic, self._on_message, qos=1)

    @property
    def connected(self) -> bool:
        return self._mqtt.connected

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def stats(self) -> EscalationStats:
        with self._lock:
            return EscalationStats(**asdict(self._stats))

    async def escalate(self, req: EscalationRequest, tensor: np.ndarray, timeout: float) -> CloudAnswer | None:
        """Send ``req`` with ``tensor`` and wait up to ``timeout`` seconds; None if no answer came."""
        return await self.send(req.request_id, encode_request(req, tensor), timeout)

    async def send(self, request_id: str, payload: bytes, timeout: float) -> CloudAnswer | None:
        """Publish an encoded request and wait up to ``timeout`` seconds for its answer; None if none came.

        ``payload`` must be ``encode_request`` output whose request id is ``request_id``.
        """
        rid = request_id
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[CloudAnswer] = loop.create_future()
        started = time.perf_counter()
        with self._lock:
            if rid in self._pending:
                raise ValueError(f"request id {rid!r} is already waiting for an answer; ids must be unique")
            self._pending[rid] = (loop, fut, started)
        try:
            if not self._mqtt.connected:
                self._count("not_sent")
                return None
            try:
                self._mqtt.publish(
                    self.request_topic,
                    payload,
                    qos=1,
                    response_topic=self.answer_topic,
                    correlation_data=rid.encode(),
                )
            except MqttError as exc:
                self._count("not_sent")
                log.warning("escalation %s not sent (%s); answering locally", rid, exc)
                return None
            self._count("sent")
            remaining = max(0.0, timeout - (time.perf_counter() - started))
            try:
                return await asyncio.wait_for(fut, remaining)
            except TimeoutError:
                self._count("timeouts")
                self._finish(rid, "timed_out")
                return None
        finally:
            with self._lock:
                self._pending.pop(rid, None)

    # --- paho's network thread -----------------------------------------------------------------
    def _on_message(self, msg: Message) -> None:
        try:
            answer, probs = decode_answer(msg.payload)
        except CodecError as exc:
            self._count("malformed")
            log.warning("malformed answer on %s ignored: %s", msg.topic, exc)
            return
        rid = answer.request_id
        if msg.correlation_data is not None and msg.correlation_data != rid.encode():
            self._count("malformed")
            log.warning(
                "answer for %r carries correlation data %r of another request; ignored",
                rid,
                msg.correlation_data,
            )
            return
        with self._lock:
            entry = self._pending.get(rid)
            outcome = self._recent.get(rid)
        if entry is None:
            stray = {"answered": "duplicates", "timed_out": "late"}.get(outcome or "", "unknown")
            self._count(stray)
            log.debug("answer for %r not awaited (%s)", rid, stray)
            if stray != "duplicates" and self.on_unmatched is not None:
                try:
                    self.on_unmatched(CloudAnswer(answer, probs, 0.0))
                except Exception:  # never raise into paho's thread
                    log.exception("handling the unmatched answer for %r failed", rid)
            return
        loop, fut, started = entry
        result = CloudAnswer(answer, probs, (time.perf_counter() - started) * 1000.0)
        try:
            loop.call_soon_threadsafe(self._resolve, fut, rid, result)
        except RuntimeError:  # the waiter's loop closed in the meantime: nobody is waiting any more
            self._count("late")

    # --- the waiter's event loop -------------------------------------------------------------
    def _resolve(self, fut: asyncio.Future[CloudAnswer], rid: str, result: CloudAnswer) -> None:
        if fut.done():
            self._count("late" if fut.cancelled() else "duplicates")
            return
        fut.set_result(result)
        self._count("answered" if result.answer.ok else "error_answers")
        self._finish(rid, "answered")

    def _finish(self, rid: str, outcome: str) -> None:
        with self._lock:
            self._recent[rid] = outcome
            self._recent.move_to_end(rid)
            while len(self._recent) > self._remember:
                self._recent.popitem(last=False)

    def _count(self, field: str) -> None:
        with self._lock:
            setattr(self._stats, field, getattr(self._stats, field) + 1)
