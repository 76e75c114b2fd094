"""P4: hub inference throughput and latency with dynamic batching vs one request at a time.

Both runs drive the hub's own ``InferenceService`` (the dynamic batcher and the model's pinned
staging, exactly what the MQTT gateway and ``POST /api/v1/predict`` submit to) with ``concurrency``
closed-loop submitters on one asyncio loop, as the gateway's callbacks and the REST route do. The
baseline is the same service with ``max_batch_size=1`` and no queue delay. The network is the
factory's ELPV cloud model (``cloud-cnn``, width 16, flip test-time averaging, 1×64×64 input),
with random weights unless ``--checkpoint`` names a trained cloud checkpoint; the JSON says which.
Inputs are random: the forward cost of a CNN does not depend on pixel values.

Run as ``edgefed bench hub --sections p4`` or, on a box with only torch, numpy, prometheus-client
(no pydantic, fastapi or edgefed install), ``PYTHONPATH=. python3 -m shared.bench.hub_batching --out
p4.json --device cuda``: nothing on this import path needs more.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import queue
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from shared.bench.common import BenchResult, Target, print_result, summarize, write_result

__all__ = ["ELPV_CLOUD", "P4Config", "main", "run_p4"]

# The factory's default cloud model for ELPV (cloud_hub.factory.train.TrainConfig at 64×64);
# tests/unit/test_hub_batcher.py checks that the two agree, so this cannot drift silently.
ELPV_CLOUD: dict[str, Any] = {
    "name": "elpv-cloud",
    "task": "elpv",
    "arch": "cloud-cnn",
    "arch_kwargs": {"in_channels": 1, "num_classes": 2, "width": 16, "tta": "flips"},
    "labels": ("functional", "defective"),
    "input_chw": (1, 64, 64),
}


@dataclass(frozen=True)
class P4Config:
    """What one P4 run measures; every field lands in the JSON's ``settings``."""

    device: str = "auto"  # auto: cuda when torch sees a GPU, else cpu
    concurrency: int = 64
    duration_s: float = 5.0
    warmup_s: float = 1.0
    max_batch_size: int = 64
    max_queue_delay_ms: float = 2.0
    warmup_batches: int = 3
    checkpoint: Path | None = None
    seed: int = 0

    def check(self) -> None:
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.concurrency < 1 or self.max_batch_size < 1:
            raise ValueError("concurrency and max_batch_size must be >= 1")
        if self.duration_s <= 0 or self.warmup_s < 0 or self.max_queue_delay_ms < 0:
            raise ValueError("duration_s must be > 0; warmup_s and max_queue_delay_ms >= 0")


def _device(wanted: str) -> str:
    import torch

    if wanted == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA device")
    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return wanted


def _device_name(device: str, cpu_model: str) -> str:
    import torch

    return torch.cuda.get_device_name(0) if device == "cuda" else cpu_model


def _build_model(device: str, checkpoint: Path | None, seed: int) -> tuple[Any, dict[str, Any]]:
    """The ELPV cloud network on ``device`` and a description of its weights (random or trained)."""
    import torch

    from cloud_hub.inference.model import LoadedModel, ModelSpec
    from shared.models.registry import build_model

    if checkpoint is None:
        torch.manual_seed(seed)
        cfg = ELPV_CLOUD
        net = build_model(cfg["arch"], **cfg["arch_kwargs"])
        spec = ModelSpec(cfg["name"], "random", cfg["task"], tuple(cfg["labels"]), tuple(cfg["input_chw"]))
        weights = {"weights": "random", "seed": seed, "arch": cfg["arch"], "arch_kwargs": cfg["arch_kwargs"]}
        return LoadedModel(net, spec, device, cpu_runtime="onnxruntime"), weights
    # A trained cloud checkpoint, read without pydantic: weights plus the metadata to rebuild them.
    data = Path(checkpoint).read_bytes()
    raw = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    meta = raw["meta"]
    if meta.get("role") != "cloud":
        raise ValueError(f"{checkpoint} is a {meta.get('role')!r} checkpoint; P4 measures the cloud model")
    net = build_model(meta["arch"], **meta["arch_kwargs"])
    net.load_state_dict(raw["state_dict"])
    inp = meta["input"]["shape"]
    spec = ModelSpec(meta["name"], meta["version"], meta["task"], tuple(meta["labels"]), tuple(inp[1:]))
    weights = {"weights": "trained", "checkpoint": str(checkpoint), "sha256": hashlib.sha256(data).hexdigest(),
               "model": f"{meta['name']}:{meta['version']}", "arch": meta["arch"], "arch_kwargs": meta["arch_kwargs"]}
    return LoadedModel(net, spec, device, cpu_runtime="onnxruntime"), weights  # as the hub runs it


async def _drive(service: Any, task: str, inputs: Sequence[np.ndarray], concurrency: int, warmup_s: float,
                 duration_s: float) -> dict[str, Any]:
    """``concurrency`` closed-loop submitters; measure what completes inside the timed window."""
    from cloud_hub.errors import HubServiceError

    t_start = time.perf_counter() + warmup_s
    t_end = t_start + duration_s
    latencies: list[float] = []
    sizes: list[int] = []
    errors: Counter[str] = Counter()
    done_in_window = 0

    async def client(i: int) -> None:
        nonlocal done_in_window
        k = i
        while (t0 := time.perf_counter()) < t_end:
            x = inputs[k % len(inputs)]
            k += concurrency
            try:
                pred = await service.submit_async(task, x)
            except HubServiceError as exc:
                errors[exc.kind] += 1
                continue
            t1 = time.perf_counter()
            if len(pred.label_ids) != x.shape[0]:
                errors["wrong_row_count"] += 1
            if t_start <= t1 <= t_end:
                done_in_window += 1
            if t0 >= t_start and t1 <= t_end:
                latencies.append((t1 - t0) * 1000.0)
                sizes.append(pred.batch_size)

    await asyncio.gather(*(client(i) for i in range(concurrency)))
    lat = summarize(latencies, digits=3)
    return {
        "throughput_rps": round(done_in_window / duration_s, 1),
        "completed_in_window": done_in_window,
        "latency_ms": lat,
        "batch_size": summarize(sizes, digits=2),
        "errors": dict(errors),
    }


def _drive_callbacks(service: Any, task: str, inputs: Sequence[np.ndarray], concurrency: int, warmup_s: float,
                     duration_s: float) -> dict[str, Any]:
    """Like the MQTT gateway: one network thread submits with ``submit_callback``, and each callback (run
    on the inference thread, where the gateway publishes its answer) hands the submitter its next request."""
    from cloud_hub.errors import HubServiceError

    inbox: queue.SimpleQueue[int] = queue.SimpleQueue()
    t_start = time.perf_counter() + warmup_s
    t_end = t_start + duration_s
    latencies: list[float] = []
    sizes: list[int] = []
    errors: Counter[str] = Counter()
    window: list[int] = []

    def on_done(i: int, t0: float, n: int, outcome: Any) -> None:
        t1 = time.perf_counter()
        if isinstance(outcome, BaseException):
            errors[outcome.kind if isinstance(outcome, HubServiceError) else type(outcome).__name__] += 1
        else:
            pred = outcome
            if len(pred.label_ids) != n:
                errors["wrong_row_count"] += 1
            if t_start <= t1 <= t_end:
                window.append(1)
            if t0 >= t_start and t1 <= t_end:
                latencies.append((t1 - t0) * 1000.0)
                sizes.append(pred.batch_size)
        inbox.put(i)

    for i in range(concurrency):
        inbox.put(i)
    outstanding, k = concurrency, 0
    while outstanding:
        i = inbox.get()
        t0 = time.perf_counter()
        if t0 >= t_end:
            outstanding -= 1
            continue
        x = inputs[k % len(inputs)]
        k += 1
        try:
            service.submit_callback(task, x, partial(on_done, i, t0, int(x.shape[0])))
        except HubServiceError as exc:
            errors[exc.kind] += 1
            inbox.put(i)
    return {
        "throughput_rps": round(len(window) / duration_s, 1),
        "completed_in_window": len(window),
        "latency_ms": summarize(latencies, digits=3),
        "batch_size": summarize(sizes, digits=2),
        "errors": dict(errors),
    }


def _measure(model: Any, cfg: P4Config, max_batch_size: int, delay_ms: float, device: str,
             inputs: Sequence[np.ndarray]) -> dict[str, Any]:
    from cloud_hub.inference import InferenceService
    from cloud_hub.metrics import HubMetrics

    service = InferenceService(device, max_batch_size, max_queue=max(10_000, 4 * cfg.concurrency),
                               metrics=HubMetrics(), max_queue_delay_ms=delay_ms, request_deadline_ms=None,
                               warmup_batches=cfg.warmup_batches)
    t0 = time.perf_counter()
    service.activate(model)  # warms every size class of this max_batch_size, as the hub does before readyz
    warm_s = time.perf_counter() - t0
    graphs = list(model.graph_sizes)
    service.start()
    args = (service, model.spec.task, inputs, cfg.concurrency, cfg.warmup_s, cfg.duration_s)
    try:
        out = {
            "gateway_like": _drive_callbacks(*args),
            "rest_like": asyncio.run(_drive(*args)),
        }
    finally:
        service.stop()
    return {"max_batch_size": max_batch_size, "max_queue_delay_ms": delay_ms, "model_warmup_s": round(warm_s, 3),
            "cuda_graph_sizes": graphs, **out}


def run_p4(cfg: P4Config | None = None) -> BenchResult:
    """Batched vs one-at-a-time through the hub's inference service; targets: ratio ≥ 5, p99 ≤ 50 ms."""
    cfg = cfg or P4Config()
    cfg.check()
    import torch

    device = _device(cfg.device)
    result = BenchResult("hub/p4", settings={**asdict(cfg), "device_used": device})
    model, weights = _build_model(device, cfg.checkpoint, cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    inputs = [rng.standard_normal((1, *model.spec.input_chw)).astype(np.float32) for _ in range(256)]
    batched = _measure(model, cfg, cfg.max_batch_size, cfg.max_queue_delay_ms, device, inputs)
    single = _measure(model, cfg, 1, 0.0, device, inputs)
    paths = {}
    for path in ("gateway_like", "rest_like"):
        b, o = batched[path], single[path]
        ratio = b["throughput_rps"] / o["throughput_rps"] if o["throughput_rps"] else float("nan")
        p99 = b["latency_ms"]["p99"]
        paths[path] = {"throughput_ratio": round(ratio, 2), "p99_ms_batched": p99, "p99_le_50ms": bool(p99 <= 50.0)}
    result.measurements = {
        "device": device,
        "device_name": _device_name(device, result.machine.get("cpu_model", "unknown")),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "model": {**weights, "input_chw": list(model.spec.input_chw), "runtime": model.runtime},
        "inputs": "random float32 1×C×H×W, one sample per request",
        "clients": {
            "gateway_like": "one submitting thread; submit_callback, answered on the inference thread "
                            "(as the MQTT gateway)",
            "rest_like": "asyncio coroutines awaiting submit_async (as POST /api/v1/predict), no HTTP",
        },
        "batched": batched,
        "one_at_a_time": single,
        **paths,
    }
    gpu_note = "" if device == "cuda" else "target is for a GPU; this run was on CPU"
    result.targets = []
    for path, label in (("gateway_like", "MQTT-gateway-like"), ("rest_like", "REST-like")):
        r = paths[path]
        result.targets += [
            Target("P4", f"throughput batched / one at a time, {label}", r["throughput_ratio"], 5.0, ">=", "x",
                   gpu_note),
            Target("P4", f"p99 latency with batching, {label}", r["p99_ms_batched"], 50.0, "<=", "ms", gpu_note),
        ]
    result.notes = [
        f"{cfg.concurrency} concurrent submitters, {cfg.duration_s:g} s timed after {cfg.warmup_s:g} s warm-up, "
        f"on {result.measurements['device_name']} ({device}), CUDA graphs for batch sizes "
        f"{batched['cuda_graph_sizes'] or 'none'}",
        f"weights: {weights['weights']}; max_batch_size {cfg.max_batch_size}, "
        f"max_queue_delay_ms {cfg.max_queue_delay_ms:g}; mean batch "
        f"{batched['gateway_like']['batch_size']['mean']} (gateway-like), "
        f"{batched['rest_like']['batch_size']['mean']} (REST-like)",
    ]
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m shared.bench.hub_batching``: P4 with only torch, numpy and prometheus-client needed."""
    d = P4Config()
    ap = argparse.ArgumentParser(prog="python -m shared.bench.hub_batching", description=run_p4.__doc__)
    ap.add_argument("--out", type=Path, default=Path("bench-results/hub-p4.json"), help="JSON result path.")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default=d.device)
    ap.add_argument("--concurrency", type=int, default=d.concurrency, help="Concurrent closed-loop submitters.")
    ap.add_argument("--duration", type=float, default=d.duration_s, help="Timed seconds per configuration.")
    ap.add_argument("--warmup", type=float, default=d.warmup_s, help="Untimed seconds before each timed window.")
    ap.add_argument("--max-batch-size", type=int, default=d.max_batch_size)
    ap.add_argument("--max-queue-delay-ms", type=float, default=d.max_queue_delay_ms)
    ap.add_argument("--warmup-batches", type=int, default=d.warmup_batches, help="Per size class, before timing.")
    ap.add_argument("--checkpoint", type=Path, default=None, help="Trained cloud checkpoint (default: random).")
    ap.add_argument("--seed", type=int, default=d.seed)
    a = ap.parse_args(argv)
    cfg = P4Config(device=a.device, concurrency=a.concurrency, duration_s=a.duration, warmup_s=a.warmup,
                   max_batch_size=a.max_batch_size, max_queue_delay_ms=a.max_queue_delay_ms,
                   warmup_batches=a.warmup_batches, checkpoint=a.checkpoint, seed=a.seed)
    try:
        result = run_p4(cfg)
    except ValueError as exc:
        ap.error(str(exc))
    print_result(result, write_result(result, a.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
