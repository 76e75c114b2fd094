"""``edgefed demo``: the whole loop on one machine with embedded defaults.

It trains (or reuses cached) models, compresses the edge model into a signed INT8 bundle, starts
mosquitto, a Flower SuperLink with one SuperNode per region, the hub and one agent per region as
child processes, and pushes the models. Then the loop:

- **phase A**: part of each region's ELPV test cases streams through the agents; unsure cases are
  escalated to the hub's full model and land, with the cloud's answer, in each agent's learning
  store; inspectors confirm the true label of a share of them (``POST /v1/feedback``);
- **federation**: the hub runs a FedAvg round on Flower over the regions' learning stores, gates the
  global model, compresses it to a signed INT8 bundle and registers it with its lineage;
- **rollout**: the new version goes to one region's device (canary), then to all, gated on live
  health while phase-B traffic keeps flowing;
- **before/after** on phase B (cases no model ever trained on): edge-only accuracy, escalation rate
  and cascade accuracy of the old and the new version, and the escalation rate each needs for the
  same cascade accuracy.

Everything it started is stopped at the end, also on Ctrl-C, SIGTERM or failure.
The helpers here (``start_loop_stack``, ``stream``, ``run_federation``, ``phase_metrics`` ...) are also
what ``edgefed bench fed --sections p9`` runs.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np

from shared.broker import DevBroker
from shared.processes import ManagedProcess, free_port, wait_for_http

if TYPE_CHECKING:
    from shared.bundle import VerifiedBundle
    from shared.data.tasks import Dataset
    from shared.hub_client import HubClient

__all__ = [
    "run_demo", "DemoReport", "LoopStack", "FedSettings", "start_loop_stack", "split_phases", "stream",
    "send_feedback", "run_federation", "edge_scores", "phase_metrics", "escalation_at_accuracy",
    "wait_for_version", "cloud_predict", "live_scores", "compare_scores", "compare_versions", "TrafficLoop",
]

TASK = "elpv"
REGIONS = ("mono", "poly-a", "poly-b")
# Escalate about this share of cases: the budget the threshold is calibrated for.
TARGET_ESCALATION = 0.15
# Share of each region's test cases streamed before federation (phase A); the rest is phase B.
PHASE_A_SHARE = 0.5
# Share of escalated phase-A cases an "inspector" confirms with the true label.
FEEDBACK_SHARE = 0.5


@dataclass(frozen=True)
class FedSettings:
    """The federation round the demo (and bench P9) asks the hub for."""

    strategy: str = "fedavg"
    rounds: int = 2
    local_epochs: int = 3
    lr: float = 1e-4
    batch_size: int = 16
    soft_weight: float = 0.5
    # The hub registers the global model if it is not worse than its parent on the reference set
    # (the task's test split) by more than this many points: the gate margin, negative = tolerance.
    gate_min_improvement_pt: float = -1.0
    timeout_s: float = 900.0


@dataclass
class DemoReport:
    task: str
    test_cases: int
    edge_only_accuracy: float
    cloud_only_accuracy: float
    cascade_accuracy: float
    escalation_rate: float
    threshold: float
    local_latency_ms_p50: float
    local_latency_ms_p99: float
    escalated_latency_ms_p50: float
    escalated_latency_ms_p99: float
    fallbacks: int
    per_region: dict[str, dict[str, float]] = field(default_factory=dict)
    bundle: dict[str, object] = field(default_factory=dict)
    phases: dict[str, object] = field(default_factory=dict)
    feedback: dict[str, object] = field(default_factory=dict)
    federation: dict[str, object] = field(default_factory=dict)
    rollout: dict[str, object] = field(default_factory=dict)
    before_after: dict[str, object] = field(default_factory=dict)
    wall_s: float = 0.0


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def _edgefed() -> list[str]:
    exe = Path(sys.executable).with_name("edgefed")
    return [str(exe)] if exe.exists() else [sys.executable, "-c", "from shared.cli import main; main()"]


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _install_sigterm() -> None:
    # Turn SIGTERM into KeyboardInterrupt so the ExitStack stops every child we started.
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def run_demo(workdir: Path, epochs: int | None = None, retrain: bool = False) -> int:
    """Run the demo; return the process exit code."""
    _install_sigterm()
    t_start = time.monotonic()
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    # Each run starts with a fresh broker, hub, Flower deployment and agents; only the trained models are reused.
    for state in ("broker", "hub", "agents", "logs", "flower", "downloads"):
        shutil.rmtree(workdir / state, ignore_errors=True)
    try:
        with ExitStack() as stack:
            report = _run(workdir, epochs, retrain, stack)
            report.wall_s = round(time.monotonic() - t_start, 1)
            _say("stopping agents, hub, SuperNodes, SuperLink and broker")
        _print_summary(report)
        out = workdir / "report.json"
        out.write_text(json.dumps(asdict(report), indent=2))
        _say(f"report written to {out}")
        return 0
    except KeyboardInterrupt:
        _say("interrupted; everything started was stopped")
        return 130
    except Exception as exc:  # the demo's boundary: one clear line, the details are in the logs
        _say(f"failed: {type(exc).__name__}: {exc}")
        _say(f"process logs are in {workdir / 'logs'} and {workdir / 'flower' / 'logs'}; "
             "everything started was stopped")
        return 1


# --- the stack: models, broker, Flower, hub, agents -----------------------------------------------
@dataclass
class LoopStack:
    """Everything ``start_loop_stack`` started and what callers need to drive it."""

    workdir: Path
    key: Path
    bundle: VerifiedBundle
    cloud_ckpt: Path
    edge_ckpt: Path
    client: HubClient
    hub_url: str
    admin: str
    threshold: float
    agent_urls: dict[str, str]
    device_ids: dict[str, str]
    superlink: str


def start_loop_stack(
    workdir: Path, stack: ExitStack, regions: Sequence[str], *, epochs: int | None = None, retrain: bool = False,
    models_dir: Path | None = None, say: Callable[[str], None] = _say, steps: int = 9,
) -> LoopStack:
    """Models (cached in ``models_dir``, default ``workdir/models``), mosquitto, a SuperLink + one SuperNode
    per region, the hub with federation, one agent per region (telemetry every second); every process is
    stopped by ``stack``."""
    from cloud_hub.factory import build_reference_models
    from federation.processes import FlowerDeployment
    from shared.bundle import pack_bundle
    from shared.hub_client import HubClient

    models_dir = Path(models_dir).resolve() if models_dir is not None else workdir / "models"
    say(f"1/{steps} models: training (or reusing cached) cloud and edge models for {TASK!r} in {models_dir}")
    # The factory's default key location inside the models directory, so that other tools given
    # the same directory (e.g. `edgefed bench edge --models demo-output/models`) sign alike.
    key = models_dir / "signing.key"
    cloud_ckpt, edge_ckpt, bundle = build_reference_models(
        models_dir, TASK, epochs=epochs, signing_key=key, force=retrain, progress=True
    )
    m = bundle.manifest.metrics
    say(
        f"    bundle {bundle.manifest.name}:{bundle.manifest.version} INT8 acc {m.int8_accuracy:.3f} "
        f"(FP32 {m.fp32_accuracy:.3f}), {m.int8_size_bytes} bytes"
    )

    say(f"2/{steps} broker and federation: mosquitto, a Flower SuperLink and one SuperNode per region")
    broker = DevBroker("127.0.0.1", free_port(), workdir / "broker").start()
    stack.callback(broker.stop)
    device_ids = {region: f"demo-{region}" for region in regions}
    agent_dirs = {region: workdir / "agents" / device_ids[region] for region in regions}
    for d in agent_dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    # Each SuperNode's data directory is its region's agent data directory: the ClientApp trains on
    # the agent's learning store, and nothing of it leaves the region but weight updates.
    flower = FlowerDeployment(workdir / "flower", agent_dirs)
    stack.callback(flower.stop)  # stops the SuperExec/ClientApp children too
    flower.start()

    say(f"3/{steps} hub: starting the cloud hub (federation on SuperLink {flower.address}) and pushing the models")
    admin = secrets.token_urlsafe(24)
    hub_port = free_port()
    hub_url = f"http://127.0.0.1:{hub_port}"
    hub = ManagedProcess(
        "hub",
        [*_edgefed(), "hub", "serve", "--host", "127.0.0.1", "--port", str(hub_port),
         "--data-dir", str(workdir / "hub"), "--broker-url", broker.url, "--admin-token", admin,
         "--signing-public-key", str(key.with_suffix(".pub")), "--superlink", flower.address,
         "--signing-key", str(key), "--fed-poll", "2", "--rollout-tick", "1"],
        workdir / "logs" / "hub.log",
        env={**os.environ, "EDGEFED_FLWR_HOME": str(workdir / "hub" / "flwr")},
    ).start()
    stack.callback(hub.stop)
    _wait(hub, f"{hub_url}/healthz", 60)
    client = stack.enter_context(HubClient(hub_url, admin))
    _push_idempotent(lambda: client.push_checkpoint(cloud_ckpt))
    _push_idempotent(lambda: client.push_bundle(pack_bundle(bundle.path)))
    _wait(hub, f"{hub_url}/readyz", 120)

    quantiles = m.calibration_confidence_quantiles or []
    threshold = float(quantiles[round(TARGET_ESCALATION * (len(quantiles) - 1))]) if quantiles else 0.8
    say(f"4/{steps} agents: one per region {', '.join(regions)}; escalation threshold {threshold:.3f} "
        f"(calibrated for ~{TARGET_ESCALATION:.0%} escalations)")
    agent_urls: dict[str, str] = {}
    for region in regions:
        device_id = device_ids[region]
        token = client.register_device(device_id, region, bundle.manifest.name).token
        port = free_port()
        proc = ManagedProcess(
            f"agent-{region}",
            [*_edgefed(), "agent", "run", "--hub", hub_url, "--broker", broker.url, "--device-id", device_id,
             "--region", region, "--token", token, "--data-dir", str(agent_dirs[region]),
             "--threshold", f"{threshold:.6f}", "--port", str(port), "--telemetry-interval", "1",
             "--trusted-key", str(key.with_suffix(".pub"))],
            workdir / "logs" / f"agent-{region}.log",
        ).start()
        stack.callback(proc.stop)
        agent_urls[region] = f"http://127.0.0.1:{port}"
        _wait(proc, f"{agent_urls[region]}/healthz", 60)
    return LoopStack(workdir=workdir, key=key, bundle=bundle, cloud_ckpt=Path(cloud_ckpt), edge_ckpt=Path(edge_ckpt),
                     client=client, hub_url=hub_url, admin=admin, threshold=threshold, agent_urls=agent_urls,
                     device_ids=device_ids, superlink=flower.address)


def split_phases(data: Dataset, regions: Sequence[str], share_a: float = PHASE_A_SHARE,
                 seed: int = 0) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """The task's test split, partitioned into regions (factories), each cut into phase A (streamed
    before federation, the only cases it may learn from) and phase B (held out for the after-measurement)."""
    from shared.data.splits import partition_elpv, task_split

    test_idx = task_split(data, seed=0).test
    rng = np.random.default_rng(seed)
    phase_a: list[tuple[int, str]] = []
    phase_b: list[tuple[int, str]] = []
    parts = partition_elpv(data, len(REGIONS), indices=test_idx)
    for region, idx in zip(REGIONS, parts, strict=True):
        idx = rng.permutation(np.asarray(idx, dtype=np.int64))  # drawn for every region: same phases for any subset
        if region not in regions:
            continue
        cut = int(round(len(idx) * share_a))
        phase_a += [(int(i), region) for i in sorted(idx[:cut])]
        phase_b += [(int(i), region) for i in sorted(idx[cut:])]
    return phase_a, phase_b


def _wait(proc: ManagedProcess, url: str, timeout: float) -> None:
    try:
        wait_for_http(url, timeout, alive=proc.alive)
    except (TimeoutError, RuntimeError) as exc:
        raise RuntimeError(f"{proc.name} not ready: {exc}\n--- {proc.log_path} ---\n{proc.log_tail()}") from None


def _push_idempotent(push: Callable[[], object]) -> None:
    from shared.hub_client import HubError

    try:
        push()
    except HubError as exc:
        if exc.status != 409:  # already registered by an earlier run of the demo
            raise


# --- traffic ------------------------------------------------------------------------------------
def _infer(http: httpx.Client, url: str, image: np.ndarray) -> dict[str, Any]:
    r = http.post(f"{url}/v1/infer", content=_png(image), headers={"Content-Type": "image/png"})
    r.raise_for_status()
    return r.json()


def stream(agent_urls: dict[str, str], cases: Sequence[tuple[int, str]], images: np.ndarray,
           desc: str = "cases") -> dict[int, dict[str, Any]]:
    """Send every case (dataset index, region) to its region's agent; the agents' answers by index."""
    from tqdm import tqdm

    results: dict[int, dict[str, Any]] = {}
    with httpx.Client(timeout=30) as http:
        def one(case: tuple[int, str]) -> tuple[int, dict[str, Any]]:
            i, region = case
            body = _infer(http, agent_urls[region], images[i])
            body["region"] = region
            return i, body

        with ThreadPoolExecutor(max_workers=6) as pool:
            for i, body in tqdm(pool.map(one, cases), total=len(cases), desc=desc, unit="img"):
                results[i] = body
    return results


class TrafficLoop:
    """Keeps sending ``cases`` round and round in a background thread (so rollout gates have live data)."""

    def __init__(self, agent_urls: dict[str, str], cases: Sequence[tuple[int, str]], images: np.ndarray,
                 workers: int = 3) -> None:
        self._urls, self._cases, self._images, self._workers = agent_urls, list(cases), images, workers
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.sent = 0
        self.errors = 0

    def _work(self, offset: int) -> None:
        with httpx.Client(timeout=30) as http:
            k = offset
            while not self._stop.is_set():
                i, region = self._cases[k % len(self._cases)]
                k += self._workers
                try:
                    _infer(http, self._urls[region], self._images[i])
                    self.sent += 1
                except httpx.HTTPError:
                    self.errors += 1
                    time.sleep(0.2)

    def __enter__(self) -> TrafficLoop:
        for w in range(self._workers):
            t = threading.Thread(target=self._work, args=(w,), daemon=True, name=f"traffic-{w}")
            t.start()
            self._threads.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=35)


def send_feedback(agent_urls: dict[str, str], results: dict[int, dict[str, Any]], labels: np.ndarray,
                  share: float = FEEDBACK_SHARE, seed: int = 0) -> dict[str, object]:
    """Inspectors confirm the true label of ``share`` of the escalated cases (``POST /v1/feedback``)."""
    escalated = sorted(i for i, r in results.items() if r["escalated"])
    rng = np.random.default_rng(seed)
    chosen = [escalated[j] for j in sorted(rng.permutation(len(escalated))[: int(round(share * len(escalated)))])]
    sent = 0
    corrected = 0
    with httpx.Client(timeout=30) as http:
        for i in chosen:
            r = results[i]
            resp = http.post(f"{agent_urls[r['region']]}/v1/feedback",
                             json={"request_id": r["request_id"], "label": int(labels[i])})
            resp.raise_for_status()
            sent += 1
            corrected += int(labels[i]) != int(r["label"])
    return {"share_of_escalated": share, "confirmed": sent, "escalated": len(escalated),
            "cloud_answer_was_wrong": corrected}


def cloud_predict(hub_url: str, token: str, data: Dataset, idx: np.ndarray, spec: Any) -> np.ndarray:
    from shared.codec import encode_frame
    from shared.data.preprocess import to_model_input

    out = []
    with httpx.Client(timeout=60, headers={"Authorization": f"Bearer {token}"}) as http:
        for start in range(0, len(idx), 64):
            batch = to_model_input(data.images[idx[start:start + 64]], spec)
            r = http.post(f"{hub_url}/api/v1/predict", content=encode_frame(0, {"task": TASK}, batch),
                          headers={"Content-Type": "application/x-edgefed-tensor"})
            r.raise_for_status()
            out.extend(r.json()["labels"])
    return np.asarray(out)


# --- federation and rollout -----------------------------------------------------------------------
def run_federation(s: LoopStack, regions: Sequence[str], settings: FedSettings,
                   say: Callable[[str], None] = _say) -> dict[str, Any]:
    """Upload the edge version's source checkpoint, POST a round to the hub, wait for its end; a summary."""
    from shared.federation_api import FedRoundCreate

    name, version = s.bundle.manifest.name, s.bundle.manifest.version
    s.client.put_source_checkpoint(name, version, s.edge_ckpt)
    body = FedRoundCreate(
        model_name=name, version=version, strategy=settings.strategy, rounds=settings.rounds,
        local_epochs=settings.local_epochs, lr=settings.lr, batch_size=settings.batch_size,
        soft_weight=settings.soft_weight, min_available=len(regions), min_fit=len(regions), fraction_evaluate=0.0,
        round_timeout_s=300.0, gate_min_improvement_pt=settings.gate_min_improvement_pt,
    )
    run = s.client.start_federation(body)
    say(f"    federation run {run.id}: {settings.strategy}, {settings.rounds} round(s) x {settings.local_epochs} "
        f"local epoch(s), lr {settings.lr:g}, regions {', '.join(regions)}; gate: register if not worse than the "
        f"parent by more than {-settings.gate_min_improvement_pt:g} pt on the reference set")
    deadline = time.monotonic() + settings.timeout_s
    seen: tuple[str, str, int] = ("", "", -1)
    while run.status not in ("finished", "failed"):
        if time.monotonic() > deadline:
            s.client.cancel_federation_run(run.id)
            raise TimeoutError(f"federation run {run.id} did not finish within {settings.timeout_s:g} s")
        time.sleep(2)
        run = s.client.get_federation_run(run.id)
        now = (run.status, run.stage, len(run.rounds))
        if now != seen:
            last = run.rounds[-1] if run.rounds else {}
            acc = last.get("val_accuracy")
            say(f"    run {run.id}: {run.status} {run.stage}" + (f"; round {len(run.rounds)} val accuracy {acc:.4f}"
                                                                  if acc is not None else ""))
            seen = now
    new_version = run.result_versions[0].split(":", 1)[1] if run.result_versions else None
    lineage: dict[str, Any] = {}
    if new_version is not None:
        lineage = s.client.lineage(name, new_version).model_dump(mode="json")
    return {
        "run_id": run.id, "flower_run_id": run.flower_run_id, "status": run.status, "result": run.result,
        "reason": run.reason, "strategy": run.strategy, "rounds": settings.rounds,
        "local_epochs": settings.local_epochs, "lr": settings.lr, "regions": run.regions,
        "per_round_val_accuracy": [r.get("val_accuracy") for r in run.rounds],
        "initial_val_accuracy": run.initial_metrics.get("val_accuracy"),
        "final_val_accuracy": run.final_metrics.get("val_accuracy"),
        "gate": run.gate, "parent_version": run.parent_version, "new_version": new_version, "lineage": lineage,
        "wall_s": (round((run.finished_at - run.created_at).total_seconds(), 1)
                   if run.finished_at and run.created_at else None),
    }


def wait_for_version(agent_urls: dict[str, str], version: str, timeout: float = 60.0) -> None:
    """Wait until every agent serves ``version``."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=5) as http:
        while True:
            serving = {r: http.get(f"{u}/healthz").json().get("model_version") for r, u in agent_urls.items()}
            if all(v == version for v in serving.values()):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"agents do not all serve version {version} after {timeout:g} s: {serving}")
            time.sleep(0.5)


# --- measurements -------------------------------------------------------------------------------
def edge_scores(model_path: Path, images: np.ndarray, spec: Any) -> tuple[np.ndarray, np.ndarray]:
    """(labels, confidences) of an edge ONNX model on raw images, exactly as the agent computes them."""
    import onnxruntime as ort

    from shared.data.preprocess import to_model_input

    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    labels, conf = [], []
    for start in range(0, len(images), 64):
        x = to_model_input(images[start:start + 64], spec)
        # The agents run one case at a time; batch-1 keeps the INT8 results identical to theirs.
        for row in x:
            logits = sess.run(None, {name: row[None]})[0][0].astype(np.float64)
            p = np.exp(logits - logits.max())
            p /= p.sum()
            labels.append(int(p.argmax()))
            conf.append(float(p.max()))
    return np.asarray(labels), np.asarray(conf)


def escalation_at_accuracy(conf: np.ndarray, edge: np.ndarray, cloud: np.ndarray, y: np.ndarray,
                           target: float) -> float | None:
    """The smallest share of cases a cascade must escalate to reach ``target`` accuracy, the escalated ones
    answered by the cloud; None if no threshold reaches it.

    Escalated sets are what a confidence threshold can escalate: every case below it. Cases of equal
    confidence (frequent with INT8 outputs) go up together, so no tie is split by an arbitrary order."""
    order = np.argsort(conf, kind="stable")
    c = np.asarray(conf, dtype=np.float64)[order]
    edge_ok = (edge == y)[order].astype(np.int64)
    cloud_ok = (cloud == y)[order].astype(np.int64)
    n = len(y)
    # correct(k) = cloud right on the k least confident + edge right on the rest
    correct = np.concatenate([[0], np.cumsum(cloud_ok)]) + (edge_ok.sum() - np.concatenate([[0], np.cumsum(edge_ok)]))
    cut = np.ones(n + 1, dtype=bool)  # k is reachable by a threshold unless it splits a group of equal confidences
    cut[1:n] = c[:-1] < c[1:]
    reach = np.flatnonzero(cut & (correct >= target * n - 1e-9))
    return None if len(reach) == 0 else float(reach[0] / n)


def phase_metrics(edge: np.ndarray, conf: np.ndarray, cloud: np.ndarray, y: np.ndarray,
                  threshold: float) -> dict[str, float]:
    """Edge-only accuracy, escalation rate at ``threshold`` and the cascade's accuracy (cloud answers escalated)."""
    esc = conf < threshold
    final = np.where(esc, cloud, edge)
    return {"edge_only_accuracy": round(float((edge == y).mean()), 4),
            "escalation_rate": round(float(esc.mean()), 4),
            "cascade_accuracy": round(float((final == y).mean()), 4)}


def _live_metrics(results: dict[int, dict[str, Any]], idx: Sequence[int], y: np.ndarray) -> dict[str, float]:
    final = np.array([results[i]["label"] for i in idx])
    edge = np.array([results[i]["edge_label"] for i in idx])
    esc = np.array([results[i]["source"] == "cloud" for i in idx])
    return {"edge_only_accuracy": round(float((edge == y).mean()), 4),
            "escalation_rate": round(float(esc.mean()), 4),
            "cascade_accuracy": round(float((final == y).mean()), 4),
            "fallbacks": int(sum(results[i]["source"] == "edge-fallback" for i in idx))}


def live_scores(results: dict[int, dict[str, Any]], idx: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(edge labels, edge confidences) the agents reported for the cases ``idx``."""
    return (np.array([results[i]["edge_label"] for i in idx]),
            np.array([results[i]["edge_confidence"] for i in idx], dtype=np.float64))


def compare_scores(old: tuple[np.ndarray, np.ndarray], new: tuple[np.ndarray, np.ndarray] | None,
                   cloud: np.ndarray, y: np.ndarray, threshold: float) -> dict[str, Any]:
    """Old vs new edge model on the same cases from their (labels, confidences): metrics at ``threshold``,
    and the escalation rate each needs for the cascade to reach the old model's cascade accuracy at
    ``threshold`` ("escalation rate at equal accuracy"), and its relative drop."""
    out: dict[str, Any] = {"cases": int(len(y)), "threshold": round(threshold, 4),
                           "cloud_only_accuracy": round(float((cloud == y).mean()), 4),
                           "old": phase_metrics(old[0], old[1], cloud, y, threshold)}
    target = out["old"]["cascade_accuracy"]
    out["equal_accuracy_target"] = target
    old_rate = escalation_at_accuracy(old[1], old[0], cloud, y, target)
    out["old_escalation_at_target"] = old_rate
    if new is None:
        return out
    out["new"] = phase_metrics(new[0], new[1], cloud, y, threshold)
    new_rate = escalation_at_accuracy(new[1], new[0], cloud, y, target)
    out["new_escalation_at_target"] = new_rate
    out["relative_drop"] = round(1 - new_rate / old_rate, 4) if new_rate is not None and old_rate else None
    # The same measure at other accuracy targets (one case is 1/n: small sets make single targets noisy).
    n = len(y)
    counts = {int((old[0] == y).sum()), int(round(target * n)), int((cloud == y).sum()),
              *range(int(round(target * n)), n + 1, max(1, n // 50))}
    targets = [k / n for k in sorted(counts)]
    out["curve"] = [
        {"target": round(t, 4), "old": escalation_at_accuracy(old[1], old[0], cloud, y, t),
         "new": escalation_at_accuracy(new[1], new[0], cloud, y, t)}
        for t in targets
    ]
    return out


def compare_versions(old_model: Path, new_model: Path | None, images: np.ndarray, spec: Any, cloud: np.ndarray,
                     y: np.ndarray, threshold: float) -> dict[str, Any]:
    """``compare_scores`` of two edge ONNX models run offline (onnxruntime, batch 1) on ``images``."""
    old = edge_scores(old_model, images, spec)
    new = edge_scores(new_model, images, spec) if new_model is not None else None
    out = compare_scores(old, new, cloud, y, threshold)
    out["old_offline"] = out.pop("old")
    if "new" in out:
        out["new_offline"] = out.pop("new")
    return out


# --- the demo -----------------------------------------------------------------------------------
def _run(workdir: Path, epochs: int | None, retrain: bool, stack: ExitStack) -> DemoReport:
    from shared.bundle import unpack_bundle
    from shared.data.tasks import load_task
    from shared.rollouts import GateThresholds, canary_then_all, rollout_summary

    s = start_loop_stack(workdir, stack, REGIONS, epochs=epochs, retrain=retrain)
    data = load_task(TASK)
    phase_a, phase_b = split_phases(data, REGIONS)
    idx_a = [i for i, _ in phase_a]
    idx_b = [i for i, _ in phase_b]

    _say(f"5/9 traffic phase A: streaming {len(phase_a)} of {len(phase_a) + len(phase_b)} ELPV test cases "
         f"through the agents (the other {len(phase_b)}, phase B, stay unseen)")
    results_a = stream(s.agent_urls, phase_a, data.images, desc="phase A")
    feedback = send_feedback(s.agent_urls, results_a, data.labels)
    _say(f"    inspectors confirmed the true label of {feedback['confirmed']} of {feedback['escalated']} escalated "
         f"cases ({feedback['cloud_answer_was_wrong']} where the cloud's answer was wrong)")

    _say("6/9 cloud-only reference: the full model over the hub's REST predict (phase A and B)")
    spec = s.bundle.manifest.input
    cloud_a = cloud_predict(s.hub_url, s.admin, data, np.asarray(idx_a), spec)
    cloud_b = cloud_predict(s.hub_url, s.admin, data, np.asarray(idx_b), spec)
    report = _report(results_a, data.labels, idx_a, cloud_a, s.threshold, s.bundle)
    report.phases = {"phase_a_cases": len(phase_a), "phase_b_cases": len(phase_b), "phase_a_share": PHASE_A_SHARE,
                     "split": "each region's test cases, shuffled (seed 0), first share = phase A"}
    report.feedback = feedback

    _say("7/9 federation: one FedAvg run over the regions' learning stores (phase-A escalations only)")
    settings = FedSettings()
    fed = run_federation(s, REGIONS, settings)
    report.federation = fed
    new_version = fed["new_version"]
    name = s.bundle.manifest.name
    y_b = data.labels[idx_b]
    if new_version is None:
        _say(f"    no new version: {fed['result'] or fed['status']}: {fed['reason']}")
        report.rollout = {"decision": "not started (no new version)"}
        report.before_after = compare_versions(s.bundle.path / "model.onnx", None, data.images[idx_b], spec,
                                               cloud_b, y_b, s.threshold)
        return report
    _say(f"    registered {name}:{new_version} (parent {fed['parent_version']}); {fed['reason']}")

    canary = s.device_ids[REGIONS[0]]
    gates = GateThresholds(min_requests=20, min_cloud_answers=5)
    _say(f"8/9 rollout: {name}:{new_version} to {canary} (canary), then all agents; 10 s windows, phase-B "
         "traffic flowing")
    with TrafficLoop(s.agent_urls, phase_b, data.images) as traffic:
        r = canary_then_all(s.client, new_version, model_name=name, canary_devices=[canary], window_s=10.0,
                            gates=gates, timeout_s=240.0,
                            on_change=lambda r: _say(f"    rollout {r.id}: {r.state}, wave {r.current_wave}"))
    lines = rollout_summary(r)
    for line in lines:
        _say("    " + line)
    report.rollout = {
        "id": r.id, "state": r.state, "canary": [canary], "window_s": 10.0, "traffic_cases_sent": traffic.sent,
        "waves": [w.model_dump(mode="json", include={"name", "percent", "devices", "decision", "detail", "gates"})
                  for w in r.waves],
        "failure": r.failure, "summary": lines,
    }

    (workdir / "downloads").mkdir(parents=True, exist_ok=True)
    new_dir = unpack_bundle(s.client.download_artifact(name, new_version), workdir / "downloads" / new_version)
    _say("9/9 before/after on phase B: old model offline (onnxruntime, same bundle the agents ran), new model "
         "offline and live through the agents")
    ba = compare_versions(s.bundle.path / "model.onnx", new_dir / "model.onnx", data.images[idx_b], spec,
                          cloud_b, y_b, s.threshold)
    if r.state == "succeeded":
        wait_for_version(s.agent_urls, new_version)
        live = stream(s.agent_urls, phase_b, data.images, desc="phase B")
        ba["new_live"] = _live_metrics(live, idx_b, y_b)
    ba["new_version"] = new_version
    report.before_after = ba
    return report


def _report(results: dict[int, dict[str, Any]], labels: np.ndarray, idx: Sequence[int], cloud: np.ndarray,
            threshold: float, bundle: VerifiedBundle) -> DemoReport:
    y = labels[idx]
    final = np.array([results[int(i)]["label"] for i in idx])
    edge = np.array([results[int(i)]["edge_label"] for i in idx])
    escalated = np.array([results[int(i)]["source"] == "cloud" for i in idx])
    fallbacks = sum(results[int(i)]["source"] == "edge-fallback" for i in idx)
    lat = np.array([results[int(i)]["latency_ms"] for i in idx])
    per_region: dict[str, dict[str, float]] = {}
    for region in REGIONS:
        mask = np.array([results[int(i)]["region"] == region for i in idx])
        if mask.any():
            per_region[region] = {
                "cases": int(mask.sum()),
                "cascade_accuracy": round(float((final[mask] == y[mask]).mean()), 4),
                "escalation_rate": round(float(escalated[mask].mean()), 4),
            }
    m = bundle.manifest
    return DemoReport(
        task=TASK,
        test_cases=len(idx),
        edge_only_accuracy=round(float((edge == y).mean()), 4),
        cloud_only_accuracy=round(float((cloud == y).mean()), 4),
        cascade_accuracy=round(float((final == y).mean()), 4),
        escalation_rate=round(float(escalated.mean()), 4),
        threshold=round(threshold, 4),
        local_latency_ms_p50=round(_percentile(lat[~escalated], 50), 2),
        local_latency_ms_p99=round(_percentile(lat[~escalated], 99), 2),
        escalated_latency_ms_p50=round(_percentile(lat[escalated], 50), 2),
        escalated_latency_ms_p99=round(_percentile(lat[escalated], 99), 2),
        fallbacks=int(fallbacks),
        per_region=per_region,
        bundle={
            "name": m.name,
            "version": m.version,
            **m.metrics.model_dump(exclude={"calibration_confidence_quantiles"}),
        },
    )


def _pct(v: object) -> str:
    return "-" if v is None else f"{float(v):.1%}"  # type: ignore[arg-type]


def _print_summary(r: DemoReport) -> None:
    rows = [
        ("phase A cases (live, version 1)", f"{r.test_cases}"),
        ("edge-only accuracy (INT8 on the agents)", f"{r.edge_only_accuracy:.1%}"),
        ("cloud-only accuracy (full model on the hub)", f"{r.cloud_only_accuracy:.1%}"),
        ("cascade accuracy (edge + escalation)", f"{r.cascade_accuracy:.1%}"),
        ("escalation rate", f"{r.escalation_rate:.1%}  (threshold {r.threshold:.3f})"),
        ("local answers latency p50 / p99", f"{r.local_latency_ms_p50:.1f} / {r.local_latency_ms_p99:.1f} ms"),
        ("escalated answers latency p50 / p99",
         f"{r.escalated_latency_ms_p50:.1f} / {r.escalated_latency_ms_p99:.1f} ms"),
        ("fallbacks (hub did not answer in time)", f"{r.fallbacks}"),
    ]
    if r.feedback:
        rows.append(("inspector feedback (true labels)",
                     f"{r.feedback['confirmed']} of {r.feedback['escalated']} escalated phase-A cases"))
    f = r.federation
    if f:
        accs = ", ".join("-" if a is None else f"{a:.4f}" for a in f.get("per_round_val_accuracy", []))
        init = f.get("initial_val_accuracy")
        rows += [
            ("federation", f"run {f['run_id']} {f['strategy']}, {f['rounds']} round(s), regions "
                           f"{', '.join(f.get('regions') or [])}: {f['status']} / {f['result'] or '-'}"),
            ("  reference val accuracy start -> rounds", f"{'-' if init is None else f'{init:.4f}'} -> {accs}"),
            ("  gate", f"{(f.get('gate') or {}).get('reason', f.get('reason', ''))}"),
            ("  new version (lineage)", f"{f.get('new_version') or '-'} (parent {f.get('parent_version')})"),
        ]
    ro = r.rollout
    if ro:
        rows.append(("rollout", f"{ro.get('state', ro.get('decision'))}"
                     + (f" (canary {', '.join(ro['canary'])}, then all)" if "canary" in ro else "")))
    ba = r.before_after
    if ba:
        old, new, live = ba.get("old_offline", {}), ba.get("new_offline", {}), ba.get("new_live")
        rows.append((f"phase B ({ba['cases']} unseen cases)", "old (offline)  ->  new (offline)  /  new (live)"))
        for key, label in (("edge_only_accuracy", "  edge-only accuracy"), ("escalation_rate", "  escalation rate"),
                           ("cascade_accuracy", "  cascade accuracy")):
            rows.append((label, f"{_pct(old.get(key))}  ->  {_pct(new.get(key))}  /  "
                                f"{_pct(live.get(key)) if live else '-'}"))
        rows.append(("  cloud-only accuracy", _pct(ba.get("cloud_only_accuracy"))))
        rows.append((f"  escalations needed for {_pct(ba.get('equal_accuracy_target'))} cascade acc.",
                     f"{_pct(ba.get('old_escalation_at_target'))}  ->  {_pct(ba.get('new_escalation_at_target'))}"
                     + (f"  (relative drop {ba['relative_drop']:.0%})" if ba.get("relative_drop") is not None
                        else "")))
    rows.append(("wall time", f"{r.wall_s:.0f} s"))
    width = max(len(k) for k, _ in rows)
    print("\n=== edgefed demo summary ===")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    for region, s in r.per_region.items():
        print(f"  region {region:<8} {s['cases']:>4} phase-A cases  cascade {s['cascade_accuracy']:.1%}  "
              f"escalated {s['escalation_rate']:.1%}")
    for line in (ro or {}).get("summary", []):
        print(f"  {line}")
    print()
