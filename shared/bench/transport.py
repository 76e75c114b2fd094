"""P3: escalation transport overhead, agent -> broker -> hub -> broker -> agent, model time excluded.

The agent side is the agent's own ``EscalationClient``; the hub is a real ``edgefed hub serve``
with a tiny random cloud model per payload size (input 1×S×S float32, so the tensor is the payload).
Overhead = round trip minus the hub-reported ``inference_ms`` (the forward pass alone).

The default network is ``edge-cnn`` at width 8 (0.2–1.1 ms per forward pass), not the heavier
``cloud-resnet`` (0.3–7.9 ms at 1–150 KB): on this kind of VM a process that sat idle through a
long forward pass wakes up late, and that wake-up lands in the overhead although it is no part of
the transport. Measured here: a raw echo whose responder waits 7.9 ms before answering takes
1.4–2.4 ms instead of 0.7–1.7 ms. ``cloud_arch`` chooses the network, to see that effect.

The baseline, in the same run and interleaved request by request: a plain MQTT v5 request/response
on the same broker — one client echoing each request with a payload of the same size (both sides
through ``shared.mqtt.MqttClient``, paho with TCP_NODELAY, QoS 1).
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

from shared.bench.common import BenchResult, Target, summarize

__all__ = ["PAYLOADS", "run_p3"]

# name -> side of the 1×S×S float32 tensor: 16² ≈ 1 KB, 88² ≈ 30 KB, 196² ≈ 150 KB.
PAYLOADS: dict[str, int] = {"1KB": 16, "30KB": 88, "150KB": 196}


class _Echo:
    """Raw request/response over one broker: a responder echoing same-size payloads, a requester waiting."""

    def __init__(self, broker_url: str) -> None:
        from shared.mqtt import MqttClient

        tag = uuid.uuid4().hex[:8]
        self.req_topic, self.ans_topic = f"bench/{tag}/echo", f"bench/{tag}/answer"
        self.responder = MqttClient(broker_url, f"bench-echo-{tag}")
        self.requester = MqttClient(broker_url, f"bench-req-{tag}")
        self._waiting: dict[bytes, tuple[asyncio.AbstractEventLoop, asyncio.Future[float]]] = {}
        self._lock = threading.Lock()

    def start(self) -> None:
        self.responder.subscribe(self.req_topic, self._answer)
        self.requester.subscribe(self.ans_topic, self._resolve)
        self.responder.start()
        self.requester.start()

    def stop(self) -> None:
        self.requester.stop()
        self.responder.stop()

    def _answer(self, msg) -> None:  # noqa: ANN001 - paho thread
        self.responder.publish(msg.response_topic, msg.payload, qos=1, correlation_data=msg.correlation_data)

    def _resolve(self, msg) -> None:  # noqa: ANN001 - paho thread
        with self._lock:
            entry = self._waiting.pop(msg.correlation_data, None)
        if entry is not None:
            loop, fut = entry
            loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(time.perf_counter()))

    async def round_trip_ms(self, payload: bytes, timeout: float) -> float:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[float] = loop.create_future()
        cid = uuid.uuid4().bytes
        with self._lock:
            self._waiting[cid] = (loop, fut)
        t0 = time.perf_counter()
        self.requester.publish(self.req_topic, payload, qos=1, response_topic=self.ans_topic, correlation_data=cid)
        return (await asyncio.wait_for(fut, timeout) - t0) * 1000.0


async def _measure(escalator, echo: _Echo, requests: int, warmup: int, timeout: float) -> dict[str, dict]:  # noqa: ANN001
    from shared.messages import EscalationRequest, encode_request

    rng = np.random.default_rng(0)
    tensors = {k: rng.normal(size=(1, 1, s, s)).astype(np.float32) for k, s in PAYLOADS.items()}
    out = {k: {"hub_rt": [], "inference": [], "echo_rt": [], "bytes": 0, "failed": 0} for k in PAYLOADS}
    for i in range(warmup + requests):
        for name, x in tensors.items():
            req = EscalationRequest(request_id=uuid.uuid4().hex, device_id="bench-transport", task=f"bench-{name}")
            payload = encode_request(req, x)
            t0 = time.perf_counter()
            ans = await escalator.send(req.request_id, payload, timeout)
            rt = (time.perf_counter() - t0) * 1000.0
            echo_rt = await echo.round_trip_ms(payload, timeout)
            if i < warmup:
                continue
            rec = out[name]
            rec["bytes"] = len(payload)
            if ans is None or not ans.answer.ok:
                rec["failed"] += 1
                continue
            rec["hub_rt"].append(rt)
            rec["inference"].append(ans.answer.inference_ms)
            rec["echo_rt"].append(echo_rt)
    return out


def run_p3(
    work_dir: Path | None = None,
    *,
    requests: int = 300,
    warmup: int = 30,
    timeout: float = 5.0,
    cloud_arch: str = "edge-cnn",
) -> BenchResult:
    """Round trips through the real hub and the raw echo, per payload size, interleaved."""
    from edge_agent.escalation import EscalationClient
    from shared.bench.stack import Stack, tiny_cloud_checkpoint
    from shared.mqtt import MqttClient

    result = BenchResult("transport/p3", {"requests_per_size": requests, "warmup": warmup, "timeout_s": timeout,
                                          "payload_sides": PAYLOADS, "qos": 1, "broker": "mosquitto (DevBroker)",
                                          "concurrency": 1, "cloud_arch": cloud_arch,
                                          "overhead": "round trip - hub inference_ms (forward pass only)",
                                          "baseline": "same-size echo over the same broker via shared.mqtt "
                                                      "(paho v5, TCP_NODELAY, QoS 1), interleaved"})
    with tempfile.TemporaryDirectory(prefix="edgefed-bench-p3-") as tmp:
        root = Path(work_dir or tmp)
        with Stack(root) as stack:
            broker = stack.start_broker()
            stack.start_hub()
            with stack.client() as client:
                for name, side in PAYLOADS.items():
                    client.push_checkpoint(
                        tiny_cloud_checkpoint(root / f"{name}.pt", f"bench-{name}", side, arch=cloud_arch)
                    )
            stack.wait_hub_ready()
            mqtt = MqttClient(broker.url, "edgefed-agent-bench-transport")
            escalator = EscalationClient(mqtt, "bench-transport")
            escalator.subscribe()
            echo = _Echo(broker.url)
            mqtt.start()
            echo.start()
            try:
                time.sleep(0.3)  # subscriptions acknowledged before the first request
                raw = asyncio.run(_measure(escalator, echo, requests, warmup, timeout))
            finally:
                echo.stop()
                mqtt.stop()
    sizes, targets = {}, []
    for name, rec in raw.items():
        hub_rt, inf = np.array(rec["hub_rt"]), np.array(rec["inference"])
        overhead = hub_rt - inf if hub_rt.size else hub_rt
        o, e = summarize(overhead), summarize(rec["echo_rt"])
        sizes[name] = {"request_bytes": rec["bytes"], "failed": rec["failed"], "hub_round_trip_ms": summarize(hub_rt),
                       "hub_inference_ms": summarize(inf), "overhead_ms": o, "raw_echo_round_trip_ms": e,
                       "overhead_over_raw_p50": round(o["p50"] / e["p50"], 3) if e["n"] else None}
        targets += [Target("P3", f"{name} overhead p50", o["p50"], 2.0, "<=", "ms", note=f"raw echo p50 {e['p50']} ms"),
                    Target("P3", f"{name} overhead p99", o["p99"], 5.0, "<=", "ms", note=f"raw echo p99 {e['p99']} ms")]
    result.measurements = {"payloads": sizes}
    result.targets = targets
    if any(r["failed"] for r in raw.values()):
        result.notes.append("some escalations got no usable answer within the timeout; see 'failed'")
    return result
