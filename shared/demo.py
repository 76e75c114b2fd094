"""``edgefed demo``: the whole loop on one machine with embedded defaults.

It trains (or reuses cached) models, compresses the edge model into a signed INT8 bundle, starts
mosquitto, the hub and one agent per region as child processes, pushes the models, streams the
ELPV test split through the agents of each region, and prints edge-only / cloud-only / cascade
accuracy, the escalation rate and latency percentiles. Everything it started is stopped at the end,
also on Ctrl-C, SIGTERM or failure.
"""

from __future__ import annotations

import io
import json
import secrets
import shutil
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np

from shared.broker import DevBroker
from shared.processes import ManagedProcess, free_port, wait_for_http

__all__ = ["run_demo", "DemoReport"]

TASK = "elpv"
REGIONS = ("mono", "poly-a", "poly-b")
# Escalate about this share of cases: the budget the threshold is calibrated for.
TARGET_ESCALATION = 0.15


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
    wall_s: float = 0.0


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def _edgefed() -> list[str]:
    exe = Path(sys.executable).with_name("edgefed")
    return [str(exe)] if exe.exists() else [sys.executable, "-c", "from shared.cli import main; main()"]


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


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
    # Each run starts with a fresh broker, hub and agents; only the trained models are reused.
    for state in ("broker", "hub", "agents", "logs"):
        shutil.rmtree(workdir / state, ignore_errors=True)
    try:
        with ExitStack() as stack:
            report = _run(workdir, epochs, retrain, stack)
            report.wall_s = round(time.monotonic() - t_start, 1)
            _say("stopping agents, hub and broker")
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
        _say(f"process logs are in {workdir / 'logs'}; everything started was stopped")
        return 1


def _run(workdir: Path, epochs: int | None, retrain: bool, stack: ExitStack) -> DemoReport:
    from cloud_hub.factory import build_reference_models
    from shared.data.splits import partition_elpv, task_split
    from shared.data.tasks import load_task
    from shared.hub_client import HubClient

    _say(f"1/6 models: training (or reusing cached) cloud and edge models for {TASK!r} in {workdir / 'models'}")
    # The factory's default key location inside the models directory, so that other tools given
    # the same directory (e.g. `edgefed bench edge --models demo-output/models`) sign alike.
    key = workdir / "models" / "signing.key"
    cloud_ckpt, _, bundle = build_reference_models(
        workdir / "models", TASK, epochs=epochs, signing_key=key, force=retrain, progress=True
    )
    m = bundle.manifest.metrics
    _say(
        f"    bundle {bundle.manifest.name}:{bundle.manifest.version} INT8 acc {m.int8_accuracy:.3f} "
        f"(FP32 {m.fp32_accuracy:.3f}), {m.int8_size_bytes} bytes"
    )

    _say("2/6 broker: starting mosquitto on loopback")
    broker = DevBroker("127.0.0.1", free_port(), workdir / "broker").start()
    stack.callback(broker.stop)

    _say("3/6 hub: starting the cloud hub and pushing the models")
    admin = secrets.token_urlsafe(24)
    hub_port = free_port()
    hub_url = f"http://127.0.0.1:{hub_port}"
    hub = ManagedProcess(
        "hub",
        [*_edgefed(), "hub", "serve", "--host", "127.0.0.1", "--port", str(hub_port),
         "--data-dir", str(workdir / "hub"), "--broker-url", broker.url, "--admin-token", admin,
         "--signing-public-key", str(key.with_suffix(".pub"))],
        workdir / "logs" / "hub.log",
    ).start()
    stack.callback(hub.stop)
    _wait(hub, f"{hub_url}/healthz", 60)
    client = stack.enter_context(HubClient(hub_url, admin))
    from shared.bundle import pack_bundle

    _push_idempotent(lambda: client.push_checkpoint(cloud_ckpt))
    _push_idempotent(lambda: client.push_bundle(pack_bundle(bundle.path)))
    _wait(hub, f"{hub_url}/readyz", 120)

    quantiles = m.calibration_confidence_quantiles or []
    threshold = float(quantiles[round(TARGET_ESCALATION * (len(quantiles) - 1))]) if quantiles else 0.8
    _say(f"4/6 agents: one per region {', '.join(REGIONS)}; escalation threshold {threshold:.3f} "
         f"(calibrated for ~{TARGET_ESCALATION:.0%} escalations)")
    agent_urls: dict[str, str] = {}
    for region in REGIONS:
        device_id = f"demo-{region}"
        token = _device_token(client, device_id, region, bundle.manifest.name)
        port = free_port()
        proc = ManagedProcess(
            f"agent-{region}",
            [*_edgefed(), "agent", "run", "--hub", hub_url, "--broker", broker.url, "--device-id", device_id,
             "--region", region, "--token", token, "--data-dir", str(workdir / "agents" / device_id),
             "--threshold", f"{threshold:.6f}", "--port", str(port),
             "--trusted-key", str(key.with_suffix(".pub"))],
            workdir / "logs" / f"agent-{region}.log",
        ).start()
        stack.callback(proc.stop)
        agent_urls[region] = f"http://127.0.0.1:{port}"
        _wait(proc, f"{agent_urls[region]}/healthz", 60)

    _say("5/6 traffic: streaming the ELPV test split through the agents of each region")
    data = load_task(TASK)
    test_idx = task_split(data, seed=0).test
    region_of: dict[int, str] = {}
    for region, idx in zip(REGIONS, partition_elpv(data, len(REGIONS), indices=test_idx), strict=True):
        region_of.update((int(i), region) for i in idx)
    results = _stream(agent_urls, [(int(i), region_of[int(i)]) for i in test_idx], data.images)

    _say("6/6 cloud-only reference: the full model over the hub's REST predict")
    cloud_labels = _cloud_predict(hub_url, admin, data, test_idx, bundle.manifest.input)
    return _report(results, data.labels, test_idx, cloud_labels, threshold, bundle)


def _wait(proc: ManagedProcess, url: str, timeout: float) -> None:
    try:
        wait_for_http(url, timeout, alive=proc.alive)
    except (TimeoutError, RuntimeError) as exc:
        raise RuntimeError(f"{proc.name} not ready: {exc}\n--- {proc.log_path} ---\n{proc.log_tail()}") from None


def _push_idempotent(push) -> None:  # noqa: ANN001
    from shared.hub_client import HubError

    try:
        push()
    except HubError as exc:
        if exc.status != 409:  # already registered by an earlier run of the demo
            raise


def _device_token(client, device_id: str, region: str, model_name: str) -> str:  # noqa: ANN001
    return client.register_device(device_id, region, model_name).token


def _stream(agent_urls: dict[str, str], cases: list[tuple[int, str]], images: np.ndarray) -> dict[int, dict]:
    results: dict[int, dict] = {}
    with httpx.Client(timeout=30) as http:
        def one(case: tuple[int, str]) -> tuple[int, dict]:
            i, region = case
            r = http.post(f"{agent_urls[region]}/v1/infer", content=_png(images[i]),
                          headers={"Content-Type": "image/png"})
            r.raise_for_status()
            body = r.json()
            body["region"] = region
            return i, body

        from tqdm import tqdm

        with ThreadPoolExecutor(max_workers=6) as pool:
            for i, body in tqdm(pool.map(one, cases), total=len(cases), desc="cases", unit="img"):
                results[i] = body
    return results


def _cloud_predict(hub_url: str, token: str, data, idx: np.ndarray, spec) -> np.ndarray:  # noqa: ANN001
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


def _report(results: dict[int, dict], labels: np.ndarray, idx: np.ndarray, cloud: np.ndarray, threshold: float,
            bundle) -> DemoReport:  # noqa: ANN001
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
        local_latency_ms_p50=round(_percentile(list(lat[~escalated]), 50), 2),
        local_latency_ms_p99=round(_percentile(list(lat[~escalated]), 99), 2),
        escalated_latency_ms_p50=round(_percentile(list(lat[escalated]), 50), 2),
        escalated_latency_ms_p99=round(_percentile(list(lat[escalated]), 99), 2),
        fallbacks=int(fallbacks),
        per_region=per_region,
        bundle={
            "name": m.name,
            "version": m.version,
            **m.metrics.model_dump(exclude={"calibration_confidence_quantiles"}),
        },
    )


def _print_summary(r: DemoReport) -> None:
    rows = [
        ("test cases", f"{r.test_cases}"),
        ("edge-only accuracy (INT8 on the agents)", f"{r.edge_only_accuracy:.1%}"),
        ("cloud-only accuracy (full model on the hub)", f"{r.cloud_only_accuracy:.1%}"),
        ("cascade accuracy (edge + escalation)", f"{r.cascade_accuracy:.1%}"),
        ("escalation rate", f"{r.escalation_rate:.1%}  (threshold {r.threshold:.3f})"),
        ("local answers latency p50 / p99", f"{r.local_latency_ms_p50:.1f} / {r.local_latency_ms_p99:.1f} ms"),
        ("escalated answers latency p50 / p99",
         f"{r.escalated_latency_ms_p50:.1f} / {r.escalated_latency_ms_p99:.1f} ms"),
        ("fallbacks (hub did not answer in time)", f"{r.fallbacks}"),
        ("wall time", f"{r.wall_s:.0f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n=== edgefed demo summary ===")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    for region, s in r.per_region.items():
        print(f"  region {region:<8} {s['cases']:>4} cases  cascade {s['cascade_accuracy']:.1%}  "
              f"escalated {s['escalation_rate']:.1%}")
    print()
