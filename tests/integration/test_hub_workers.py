"""Horizontal scale: one API hub (`hub serve`, with its own gateway) and two `hub worker` processes
share `$share/hub/edgefed/v1/+/escalate` on a real mosquitto, the same database and data directory.

Every escalation is answered exactly once; every process answers some; malformed payloads get error
answers and counted metrics from whichever process got them, and that process keeps answering; a
worker stopped with SIGTERM mid-stream leaves the shared subscription and answers what it took, so
nothing needs re-sending; a worker killed with SIGKILL loses what it held (mosquitto does not hand a
dead member's in-flight messages to the others), and re-sending those with the same request id, as
the agent's outbox does, gets them answered by the rest.
"""

from __future__ import annotations

import json
import os
import queue
import struct
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shared import topics
from shared.broker import DevBroker
from shared.codec import MAGIC, encode_frame
from shared.messages import EscalationAnswer, EscalationRequest, MessageKind, decode_answer, encode_request
from shared.mqtt import Message, MqttClient
from shared.processes import ManagedProcess, free_port, wait_for_http
from tests.hub_fixtures import HubModels, HubProcess

pytest_plugins = ["tests.hub_fixtures"]
pytestmark = pytest.mark.integration

JSON_LOGS = ["--log-format", "json"]


class JsonLogHub(HubProcess):
    """`hub serve` writing JSON log lines."""

    ENTRY = [*HubProcess.ENTRY, *JSON_LOGS]


class Worker:
    """`edgefed hub worker` on the API hub's database and data directory."""

    def __init__(self, worker_id: str, data_dir: Path, broker_url: str) -> None:
        self.worker_id = worker_id
        self.port = free_port()
        argv = [*HubProcess.ENTRY, *JSON_LOGS, "hub", "worker", "--host", "127.0.0.1", "--port", str(self.port),
                "--data-dir", str(data_dir), "--broker-url", broker_url, "--worker-id", worker_id]
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFED_")}
        self.log_path = data_dir.parent / f"{worker_id}.log"
        self.process = ManagedProcess(worker_id, argv, self.log_path, env=env)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self) -> Worker:
        try:
            wait_for_http(f"{self.base_url}/readyz", 90, alive=self.process.alive)
        except (TimeoutError, RuntimeError) as exc:
            self.process.stop()
            raise RuntimeError(f"{self.worker_id} not ready: {exc}\n{self.process.log_tail(60)}") from None
        return self

    def metrics_text(self) -> str:
        return httpx.get(f"{self.base_url}/metrics", timeout=10).text


@dataclass
class Cluster:
    broker: DevBroker
    api: HubProcess
    workers: dict[str, Worker]
    api_worker_id: str = ""

    def members(self) -> list[HubProcess | Worker]:
        return [self.api, *(w for w in self.workers.values() if w.process.alive())]

    def log_of(self, worker_id: str) -> Path:
        return self.api.log_path if worker_id == self.api_worker_id else self.workers[worker_id].log_path


@pytest.fixture(scope="module")
def cluster(hub_models: HubModels, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("workers")
    broker = DevBroker("127.0.0.1", free_port(), root / "broker").start()
    workers: dict[str, Worker] = {}
    api: HubProcess | None = None
    try:
        # Workers started first wait for the API hub to migrate the database, then load its cloud model.
        for wid in ("worker-a", "worker-b"):
            w = Worker(wid, root / "hub", broker.url)
            w.process.start()
            workers[wid] = w
        api = _start_api(root / "hub", broker.url, hub_models)
        for w in workers.values():
            w.wait_ready()
        yield Cluster(broker, api, workers, _api_worker_id(api))
    finally:
        for w in workers.values():
            w.process.stop()
        if api is not None:
            api.stop()
        broker.stop()


def _start_api(data_dir: Path, broker_url: str, models: HubModels) -> HubProcess:
    api = JsonLogHub(data_dir, broker_url, public_keys=[models.public_key_path], default_model=models.edge_name)
    api.start()
    try:
        with api.client() as client:
            client.push_checkpoint(models.checkpoint_path)
        api.wait_ready()
    except BaseException:
        api.stop()
        raise
    return api


def _api_worker_id(api: HubProcess) -> str:
    for line in api.log_path.read_text().splitlines():
        if line.startswith("{") and "started: data" in line:
            return str(json.loads(line)["message"].split()[2])
    raise AssertionError(f"API hub logged no start line:\n{api.log_tail()}")


# --- devices ---------------------------------------------------------------------------------------
@dataclass
class Fleet:
    """A few real MQTT v5 device clients; answers collected by correlation data."""

    broker_url: str
    n: int = 8
    clients: dict[str, MqttClient] = field(default_factory=dict)
    answers: dict[str, list[EscalationAnswer]] = field(default_factory=lambda: defaultdict(list))
    payloads: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _arrived: queue.Queue[str] = field(default_factory=queue.Queue)

    def __enter__(self) -> Fleet:
        tag = uuid.uuid4().hex[:6]
        for i in range(self.n):
            device_id = f"w-{tag}-{i}"
            client = MqttClient(self.broker_url, f"dev-{device_id}")
            client.subscribe(topics.answer(device_id), self._on_answer, qos=1)
            client.start()
            self.clients[device_id] = client
        time.sleep(0.3)  # subscriptions acknowledged
        return self

    def __exit__(self, *exc: object) -> None:
        for client in self.clients.values():
            client.stop()

    def _on_answer(self, msg: Message) -> None:
        answer, _ = decode_answer(msg.payload)
        corr = (msg.correlation_data or b"").decode()
        with self._lock:
            self.answers[corr].append(answer)
        self._arrived.put(corr)

    def send(self, i: int, payload: bytes | None = None, corr: str | None = None) -> str:
        device_id = list(self.clients)[i % self.n]
        corr = corr or f"r{i}-{uuid.uuid4().hex[:6]}"
        if payload is None:
            req = EscalationRequest(request_id=corr, device_id=device_id, task="t")
            payload = encode_request(req, _x(i))
        self.payloads[corr] = (device_id, payload)
        self.resend(corr)
        return corr

    def resend(self, corr: str) -> None:
        device_id, payload = self.payloads[corr]
        self.clients[device_id].publish(topics.escalate(device_id), payload, qos=1,
                                        response_topic=topics.answer(device_id), correlation_data=corr.encode())

    def wait(self, corrs: list[str], timeout: float) -> list[str]:
        """Wait until every id in ``corrs`` has an answer; return those still without one."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                missing = [c for c in corrs if not self.answers.get(c)]
            if not missing:
                return []
            time.sleep(0.05)
        return missing

    def answered_once(self, corrs: list[str]) -> bool:
        with self._lock:
            return all(len(self.answers[c]) == 1 for c in corrs)

    def by_worker(self, corrs: list[str]) -> Counter[str]:
        with self._lock:
            return Counter(a.worker for c in corrs for a in self.answers[c])


def _x(seed: int, shape: tuple[int, ...] = (1, 1, 32, 32)) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _counter(text: str, family_name: str, label: str | None = None) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == family_name:
            for s in family.samples:
                if s.name.endswith("_total"):
                    key = s.labels.get(label, "") if label else ""
                    out[key] = out.get(key, 0.0) + s.value
    return out


def _sum_metric(cluster: Cluster, family: str, label: str | None = None) -> dict[str, float]:
    total: Counter[str] = Counter()
    for member in cluster.members():
        total.update(_counter(member.metrics_text(), family, label))
    return dict(total)


# --- tests -----------------------------------------------------------------------------------------
def test_escalations_are_split_across_processes_and_answered_exactly_once(cluster: Cluster) -> None:
    before = _sum_metric(cluster, "edgefed_hub_escalations_answered")
    with Fleet(cluster.broker.url) as fleet:
        corrs = [fleet.send(i) for i in range(240)]
        assert fleet.wait(corrs, 60) == []
        time.sleep(0.5)  # a duplicate would arrive by now
        assert fleet.answered_once(corrs)
        with fleet._lock:
            assert all(fleet.answers[c][0].ok and fleet.answers[c][0].request_id == c for c in corrs)
        share = fleet.by_worker(corrs)
    # Every member of the shared subscription answered some; the answer names who did.
    assert set(share) == {cluster.api_worker_id, "worker-a", "worker-b"}, share
    assert min(share.values()) >= 24, share
    after = _sum_metric(cluster, "edgefed_hub_escalations_answered")
    assert after.get("", 0) - before.get("", 0) == 240
    for wid in ("worker-a", "worker-b"):  # each worker's own /metrics counts its own answers
        own = _counter(cluster.workers[wid].metrics_text(), "edgefed_hub_escalations_answered")
        assert own[""] >= share[wid]


def _frame(kind: int, dtype: int, shape: list[int], meta: bytes, data: bytes) -> bytes:
    head = MAGIC + bytes([kind, dtype, len(shape), 0]) + b"".join(struct.pack("<I", d) for d in shape)
    return head + struct.pack("<I", len(meta)) + meta + data


def test_malformed_payloads_get_error_answers_metrics_and_logs_and_every_process_keeps_answering(
    cluster: Cluster,
) -> None:
    before = _sum_metric(cluster, "edgefed_hub_escalation_errors", "kind")
    with Fleet(cluster.broker.url, n=1) as fleet:
        device_id = next(iter(fleet.clients))
        meta = json.dumps({"request_id": "m", "device_id": device_id, "task": "t"}).encode()
        good = encode_request(EscalationRequest(request_id="g", device_id=device_id, task="t"), _x(0))
        x16 = _x(0, (1, 1, 16, 16))
        cases = {  # name: (payload, error kind, words the error must contain)
            "empty": (b"", "bad_payload", "shorter than"),
            "garbage": (b"GET / HTTP/1.1\r\n\r\n", "bad_payload", "bad magic"),
            "wrong-kind": (_frame(MessageKind.ANSWER, 1, [1, 1, 32, 32], meta, _x(0).tobytes()),
                           "bad_payload", "expected an escalation frame"),
            "wrong-dtype-code": (_frame(1, 42, [1], meta, bytes(4)), "bad_payload", "unknown dtype code 42"),
            "truncated": (good[:-100], "bad_payload", "tensor data is"),
            "no-tensor": (encode_frame(MessageKind.ESCALATE, json.loads(meta)), "bad_payload", "no tensor"),
            "bad-meta": (encode_frame(MessageKind.ESCALATE, {"request_id": "m", "device_id": device_id}, _x(0)),
                         "bad_payload", "task"),
            "meta-not-json": (_frame(1, 1, [1], b"{oops", bytes(4)), "bad_payload", "not valid JSON"),
            "wrong-shape": (encode_request(EscalationRequest(request_id="s", device_id=device_id, task="t"), x16),
                            "bad_shape", "does not fit model t-cloud:1"),
            "oversized": (b"\0" * (4 * 1024 * 1024 + 1), "oversized", "the limit is 4194304"),
        }
        for name, (payload, _, _) in cases.items():
            fleet.send(0, payload, corr=f"bad-{name}")
        assert fleet.wait([f"bad-{n}" for n in cases], 30) == []
        who: Counter[str] = Counter()
        for name, (_, kind, needle) in cases.items():
            [answer] = fleet.answers[f"bad-{name}"]
            assert not answer.ok and answer.error_kind == kind and needle in (answer.error or ""), (name, answer)
            who[answer.worker] += 1
            # The refusal is logged by the process that answered, as a JSON line carrying the request id.
            lines = [json.loads(line) for line in cluster.log_of(answer.worker).read_text().splitlines()
                     if line.startswith("{")]
            assert any(rec.get("request_id") == f"bad-{name}" and rec["level"] == "WARNING"
                       and kind in rec["message"] for rec in lines), name
        assert len(who) >= 2, who  # spread over the processes, so more than one was fed bad input
        # Every process is still alive and answers good requests.
        corrs = [fleet.send(i) for i in range(30)]
        assert fleet.wait(corrs, 30) == [] and all(fleet.answers[c][0].ok for c in corrs)
    assert all(w.process.alive() for w in cluster.workers.values())
    after = _sum_metric(cluster, "edgefed_hub_escalation_errors", "kind")
    delta = {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}
    assert delta == {"bad_payload": 8, "bad_shape": 1, "oversized": 1}


def _stream(fleet: Fleet, n: int, rate: float, at: int, action: callable) -> list[str]:  # type: ignore[valid-type]
    """Send ``n`` escalations at ``rate``/s; run ``action`` (in a thread) after the ``at``-th."""
    corrs, thread = [], None
    for i in range(n):
        corrs.append(fleet.send(i))
        if i == at:
            thread = threading.Thread(target=action)
            thread.start()
        time.sleep(1.0 / rate)
    if thread is not None:
        thread.join(30)
    return corrs


def test_a_worker_stopped_or_killed_mid_stream_leaves_the_rest_answering(cluster: Cluster) -> None:
    a, b = cluster.workers["worker-a"], cluster.workers["worker-b"]
    codes: dict[str, int | None] = {}
    with Fleet(cluster.broker.url) as fleet:
        # SIGTERM: the worker leaves the shared subscription, answers what it holds, exits cleanly.
        corrs = _stream(fleet, 300, 150, 100, lambda: codes.__setitem__("a", a.process.stop()))
        assert fleet.wait(corrs, 30) == [], "a graceful stop must not need re-sends"
        time.sleep(0.5)
        assert fleet.answered_once(corrs)
        share = fleet.by_worker(corrs)
        assert share["worker-a"] > 0 and share["worker-b"] > 0 and share[cluster.api_worker_id] > 0, share
        assert codes["a"] == 0
        log = a.log_path.read_text()
        assert "left the shared subscription" in log and "hub worker-a stopped" in log

        # SIGKILL: what the dead worker held is lost; re-sending it (same request id, as the agent's
        # outbox does) gets it answered by the remaining member.
        corrs = _stream(fleet, 300, 150, 100, b.process.kill)
        missing = fleet.wait(corrs, 5)
        print(f"SIGKILL mid-stream: {len(missing)} of {len(corrs)} escalations had to be re-sent")
        for corr in missing:
            fleet.resend(corr)
        assert fleet.wait(corrs, 30) == []
        time.sleep(0.5)
        with fleet._lock:
            counts = {c: len(fleet.answers[c]) for c in corrs}
            late = [a.worker for c in missing for a in fleet.answers[c]]
        assert all(n == 1 for c, n in counts.items() if c not in missing)
        assert set(late) <= {cluster.api_worker_id}
        assert len(missing) < 150, f"{len(missing)} of 300 lost"
        assert fleet.by_worker(corrs)[cluster.api_worker_id] > 0
