"""P5: one hub (`edgefed hub serve`: API + MQTT gateway, CPU, a tiny cloud model) under many agents.

Simulated agents are real MQTT v5 clients (``shared.mqtt.MqttClient``: paho, TCP_NODELAY, QoS 1),
one connection each, spread over a few load-generator processes so one Python process's GIL does not
cap the offered load. Each process connects its agents, then offers its share of ``rate``
escalations per second open-loop (on a fixed schedule, whether or not answers came back) for
``duration_s``, round-robin over its agents, each escalation a fresh request id on the agent's own
``edgefed/v1/{id}/escalate`` with its answer topic as Response Topic. Afterwards it waits up to
``drain_s`` for outstanding answers.

Measured: agents connected (at the start and still at the end), escalations offered and answered
per second, round-trip latency (send to answer, p50/p99), lost = sent - answered (must be 0),
duplicate and error answers, and how far the generators fell behind their schedule (a generator
that cannot keep up offers less than asked: the result says so instead of hiding it).
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import resource
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from shared.bench.common import BenchResult, Target, summarize

__all__ = ["run_p5"]

AGENTS_PER_PROCESS = 500
TASK = "bench-p5"
STEADY_AFTER_S = 1.0  # the sustained rate counts answers from this long after the start to the window's end
SIDE = 16  # 1×16×16 float32 input: ~1 KB escalations, a model that costs little next to the transport


def raise_open_files_limit() -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit (children, mosquitto too, inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


@dataclass
class _Share:
    """What one load-generator process does."""

    index: int
    broker_url: str
    device_ids: list[str]
    rate: float
    duration_s: float
    drain_s: float
    connect_timeout_s: float


@dataclass
class _Outcome:
    index: int
    agents: int
    connected_at_start: int
    connected_at_end: int
    sent: int = 0
    answered: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    first_send: float = 0.0
    last_send: float = 0.0
    last_answer: float = 0.0
    answered_in_window: int = 0
    answered_steady: int = 0  # answers received from 1 s after the start to the end of the window
    max_lag_ms: float = 0.0
    publish_failures: int = 0
    cpu_s: float = 0.0  # this generator's CPU seconds from its start signal to the end of its drain


def _generator(share: _Share, conn: Connection) -> None:
    """One load-generator process: connect agents, report, wait for the start time, offer load.

    All of its agents run in this one thread (``MqttClient.open_unthreaded``): one selector over their
    sockets, publishes written at once. A thread per agent would spend the generator's CPU on
    switching between hundreds of threads, CPU the hub shares on a small machine.
    """
    raise_open_files_limit()
    import selectors

    from shared import topics
    from shared.messages import EscalationRequest, decode_answer, encode_request
    from shared.mqtt import Message, MqttClient, MqttError

    sent_at: dict[bytes, float] = {}
    answered: set[bytes] = set()
    out = _Outcome(share.index, len(share.device_ids), 0, 0)
    window_end = [math.inf]
    steady_from = [math.inf]
    raw_answers: list[bytes] = []  # decoded after the drain: the generator spends its CPU on sending

    def on_answer(msg: Message) -> None:
        now = time.time()
        corr = msg.correlation_data or b""
        t0 = sent_at.get(corr)
        if t0 is None:
            return
        if corr in answered:
            out.duplicates += 1
            return
        answered.add(corr)
        out.answered += 1
        out.last_answer = max(out.last_answer, now)
        out.latencies_ms.append((now - t0) * 1000.0)
        if now <= window_end[0]:
            out.answered_in_window += 1
            if now >= steady_from[0]:
                out.answered_steady += 1
        raw_answers.append(msg.payload)

    sel = selectors.DefaultSelector()
    clients: list[MqttClient] = []
    lost: set[int] = set()
    last_tick = [time.monotonic()]

    def pump(timeout: float) -> None:
        for key, _ in sel.select(timeout):
            client: MqttClient = key.data
            if not client.pump():
                lost.add(id(client))
                sel.unregister(key.fileobj)
        if time.monotonic() - last_tick[0] > 5.0:
            last_tick[0] = time.monotonic()
            for c in clients:
                if id(c) not in lost:
                    c.tick()

    def wait(seconds: float) -> None:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            pump(left)

    for device_id in share.device_ids:
        c = MqttClient(share.broker_url, f"p5-{device_id}", keepalive=60)
        c.subscribe(topics.answer(device_id), on_answer, qos=1)
        clients.append(c)
    try:
        for c in clients:
            try:
                sel.register(c.open_unthreaded(), selectors.EVENT_READ, c)
            except MqttError:
                lost.add(id(c))
        deadline = time.monotonic() + share.connect_timeout_s
        while time.monotonic() < deadline and not all(c.connected for c in clients):
            pump(0.05)
        wait(0.5)  # answer subscriptions acknowledged
        out.connected_at_start = sum(c.connected for c in clients)
        # Every escalation is encoded before the start (a fresh request id each), so the timed loop
        # only publishes: the generators' CPU goes to the MQTT traffic, not to building messages.
        x = np.random.default_rng(share.index).standard_normal((1, 1, SIDE, SIDE)).astype(np.float32)
        interval = 1.0 / share.rate
        n_total = int(share.rate * share.duration_s)
        prepared = []
        for i in range(n_total):
            device_id = share.device_ids[i % len(clients)]
            rid = uuid.uuid4().hex
            prepared.append((rid.encode(), topics.escalate(device_id), topics.answer(device_id),
                             encode_request(EscalationRequest(request_id=rid, device_id=device_id, task=TASK), x)))
        conn.send(("ready", out.connected_at_start))
        while not conn.poll(0):
            pump(0.01)  # keep answering the broker (pings) while the others connect
        start_at: float = conn.recv()
        wait(start_at - time.time())
        window_end[0] = start_at + share.duration_s
        steady_from[0] = start_at + STEADY_AFTER_S
        out.first_send = time.time()
        cpu0 = time.process_time()
        for i in range(n_total):
            due = start_at + i * interval
            now = time.time()
            if due > now:
                wait(due - now)
            else:
                out.max_lag_ms = max(out.max_lag_ms, (now - due) * 1000.0)
                pump(0)
            corr, topic, answer_topic, payload = prepared[i]
            sent_at[corr] = time.time()
            try:
                clients[i % len(clients)].publish(topic, payload, qos=1, response_topic=answer_topic,
                                                  correlation_data=corr)
                out.sent += 1
            except MqttError:
                del sent_at[corr]
                out.publish_failures += 1
        out.last_send = time.time()
        drain_until = time.monotonic() + share.drain_s
        while time.monotonic() < drain_until and out.answered < out.sent:
            pump(0.05)
        wait(0.3)  # a duplicate would arrive by now
        out.cpu_s = time.process_time() - cpu0
        for payload in raw_answers:
            try:
                answer, _ = decode_answer(payload)
            except ValueError:
                out.errors["undecodable_answer"] = out.errors.get("undecodable_answer", 0) + 1
                continue
            if answer.ok:
                out.ok += 1
            else:
                kind = answer.error_kind or "error"
                out.errors[kind] = out.errors.get(kind, 0) + 1
        out.connected_at_end = sum(c.connected and id(c) not in lost for c in clients)
    finally:
        for c in clients:
            try:
                c.stop()
            except Exception:  # noqa: BLE001 - stopping the rest matters more
                pass
        sel.close()
    conn.send(("done", out))


def run_p5(
    agents: int = 1000,
    rate: float = 1000.0,
    duration_s: float = 20.0,
    *,
    processes: int | None = None,
    drain_s: float = 15.0,
    work_dir: Path | None = None,
) -> BenchResult:
    """Run the load against a fresh broker and hub; see the module docstring for what is measured."""
    from shared.bench.stack import Stack, tiny_cloud_checkpoint

    procs_n = processes or max(2, min(8, math.ceil(agents / AGENTS_PER_PROCESS)))
    procs_n = min(procs_n, agents)
    nofile = raise_open_files_limit()
    settings: dict[str, Any] = {
        "agents": agents, "offered_rate_per_s": rate, "duration_s": duration_s, "drain_s": drain_s,
        "generator_processes": procs_n, "qos": 1, "payload": f"1×1×{SIDE}×{SIDE} float32",
        "hub": "edgefed hub serve (API + gateway), CPU",
        "model": "CloudCNN width 8, random weights (onnxruntime on the CPU, ~1 ms per batch of 32)",
        "hub_batching": "the hub's defaults", "broker": "mosquitto (DevBroker)", "open_files_limit": list(nofile),
        "load": "open loop: fixed schedule per generator, round-robin over its agents",
    }
    result = BenchResult("hub/p5", settings)
    with tempfile.TemporaryDirectory(prefix="edgefed-bench-p5-") as tmp:
        root = Path(work_dir or tmp)
        with Stack(root) as stack:
            broker = stack.start_broker()
            stack.start_hub()
            with stack.client() as client:
                client.push_checkpoint(tiny_cloud_checkpoint(root / "p5.pt", TASK, SIDE, arch="cloud-cnn"))
            stack.wait_hub_ready()
            assert stack.hub is not None and broker.process is not None
            pids = {"hub": stack.hub.pid, "broker": broker.process.pid}
            before = {k: _cpu_seconds(pid) for k, pid in pids.items()}
            outcomes = _drive(broker.url, agents, rate, duration_s, drain_s, procs_n)
            cpu = {k: round(_cpu_seconds(pid) - before[k], 2) for k, pid in pids.items()}
            cpu["load_generators"] = round(sum(o.cpu_s for o in outcomes), 2)
            hub_metrics = _hub_counters(stack.hub_url)
    _report(result, outcomes, agents, rate, duration_s, hub_metrics, cpu)
    return result


def _drive(broker_url: str, agents: int, rate: float, duration_s: float, drain_s: float, n: int) -> list[_Outcome]:
    ctx = mp.get_context("spawn")
    tag = uuid.uuid4().hex[:6]
    ids = [f"p5-{tag}-{i:05d}" for i in range(agents)]
    shares = [
        _Share(k, broker_url, ids[k::n], rate * len(ids[k::n]) / agents, duration_s, drain_s,
               connect_timeout_s=60.0)
        for k in range(n)
    ]
    pipes, workers = [], []
    try:
        for share in shares:
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_generator, args=(share, child), name=f"p5-gen-{share.index}", daemon=True)
            p.start()
            pipes.append(parent)
            workers.append(p)
        for parent in pipes:
            if not parent.poll(180):
                raise RuntimeError("a load generator did not connect its agents within 180 s")
            parent.recv()
        start_at = time.time() + 1.0
        for parent in pipes:
            parent.send(start_at)
        outcomes = []
        for parent in pipes:
            if not parent.poll(duration_s + drain_s + 120):
                raise RuntimeError("a load generator did not finish")
            _, out = parent.recv()
            outcomes.append(out)
        return outcomes
    finally:
        for p in workers:
            p.join(10)
            if p.is_alive():
                p.terminate()
                p.join(5)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc), children not included."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _hub_counters(hub_url: str) -> dict[str, float]:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    try:
        text = httpx.get(f"{hub_url}/metrics", timeout=10).text
    except httpx.HTTPError:
        return out
    for family in text_string_to_metric_families(text):
        if family.name in ("edgefed_hub_escalations_received", "edgefed_hub_escalations_answered",
                           "edgefed_hub_escalation_errors"):
            for s in family.samples:
                if s.name.endswith("_total"):
                    out[family.name] = out.get(family.name, 0.0) + s.value
                    if "kind" in s.labels:
                        key = f"{family.name}:{s.labels['kind']}"
                        out[key] = out.get(key, 0.0) + s.value
        if family.name in ("edgefed_hub_inference_latency_seconds", "edgefed_hub_queue_delay_seconds"):
            for s in family.samples:
                if s.name.endswith(("_sum", "_count")):
                    key = family.name.removeprefix("edgefed_hub_") + s.name[len(family.name):]
                    out[key] = out.get(key, 0.0) + s.value
        if family.name == "edgefed_hub_batch_size":
            for s in family.samples:
                if s.name.endswith("_sum"):
                    out["batch_size_sum"] = out.get("batch_size_sum", 0.0) + s.value
                elif s.name.endswith("_count"):
                    out["batches"] = out.get("batches", 0.0) + s.value
    return out


def _mean_ms(hub: dict[str, float], histogram: str) -> float | None:
    count = hub.get(f"{histogram}_count")
    return round(1000.0 * hub[f"{histogram}_sum"] / count, 3) if count else None


def _report(result: BenchResult, outcomes: list[_Outcome], agents: int, rate: float, duration_s: float,
            hub: dict[str, float], cpu: dict[str, float]) -> None:
    sent = sum(o.sent for o in outcomes)
    answered = sum(o.answered for o in outcomes)
    lost = sent - answered
    connected_start = sum(o.connected_at_start for o in outcomes)
    connected_end = sum(o.connected_at_end for o in outcomes)
    first = min(o.first_send for o in outcomes)
    last_send = max(o.last_send for o in outcomes)
    last_answer = max(o.last_answer for o in outcomes)
    offered = sent / max(1e-9, last_send - first)
    in_window = sum(o.answered_in_window for o in outcomes)
    # Sustained: the answer rate once the pipeline is full (from 1 s in to the end of the offered load).
    # Counting from 0 s would charge the first round trip's latency to the rate.
    sustained = sum(o.answered_steady for o in outcomes) / max(1e-9, duration_s - STEADY_AFTER_S)
    overall = answered / max(1e-9, last_answer - first)
    lat = np.concatenate([np.asarray(o.latencies_ms, dtype=np.float64) for o in outcomes])
    errors: dict[str, int] = {}
    for o in outcomes:
        for k, v in o.errors.items():
            errors[k] = errors.get(k, 0) + v
    batches = hub.get("batches", 0.0)
    result.measurements = {
        "agents_connected_at_start": connected_start,
        "agents_connected_at_end": connected_end,
        "sent": sent,
        "answered": answered,
        "answered_ok": sum(o.ok for o in outcomes),
        "error_answers": errors,
        "duplicates": sum(o.duplicates for o in outcomes),
        "lost": lost,
        "publish_failures": sum(o.publish_failures for o in outcomes),
        "offered_per_s": round(offered, 1),
        "answered_per_s_sustained": round(sustained, 1),
        "answered_within_window_per_s": round(in_window / duration_s, 1),
        "answered_per_s_including_drain": round(overall, 1),
        "drain_after_last_send_s": round(max(0.0, last_answer - last_send), 3),
        "round_trip_ms": summarize(lat),
        "generator_max_lag_ms": round(max(o.max_lag_ms for o in outcomes), 1),
        "hub_counters": hub,
        "hub_mean_batch_size": round(hub.get("batch_size_sum", 0.0) / batches, 2) if batches else None,
        "hub_mean_model_ms_per_batch": _mean_ms(hub, "inference_latency_seconds"),
        "hub_mean_queue_delay_ms": _mean_ms(hub, "queue_delay_seconds"),
        # CPU seconds each part used during the run (load, then drain): where this machine's 2 cores went.
        "cpu_seconds": cpu,
        "cpu_ms_per_escalation": {k: round(1000 * v / max(1, answered), 3) for k, v in cpu.items()},
        "per_generator": [
            {"agents": o.agents, "connected": o.connected_at_start, "sent": o.sent, "answered": o.answered}
            for o in outcomes
        ],
    }
    result.targets = [
        Target("P5", "connected agents", connected_start, 1000, ">=", note=f"still connected at end: {connected_end}"),
        Target("P5", "escalations answered per second, sustained", sustained, 1000, ">=", "/s",
               note=f"offered {offered:.0f}/s over {duration_s:.0f} s; answers received from {STEADY_AFTER_S:g} s "
               "after the start to the end of the offered load"),
        Target("P5", "lost (sent - answered)", lost, 0, "<=", note=f"{sent} sent"),
    ]
    if offered < 0.95 * rate:
        result.notes.append(
            f"the load generators offered {offered:.0f}/s of the {rate:.0f}/s asked (max lag "
            f"{result.measurements['generator_max_lag_ms']} ms): the machine, not only the hub, was the limit"
        )
    if errors:
        result.notes.append(f"error answers: {errors}")
    if lost:
        result.notes.append(
            f"{lost} escalations had no answer {result.settings['drain_s']:.0f} s after the last send; the hub's own "
            f"counters: received {hub.get('edgefed_hub_escalations_received', 0):.0f}, answered "
            f"{hub.get('edgefed_hub_escalations_answered', 0):.0f}, refused "
            f"{hub.get('edgefed_hub_escalation_errors', 0):.0f} (an overloaded hub or broker queues, then sheds)"
        )
    result.notes.append("hub, broker and load generators share this machine's cores; see machine.usable_cores")
