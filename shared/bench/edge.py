"""P1: the INT8 edge model against the FP32 ONNX of the same network (and the cloud model in PyTorch).

Both ONNX models run batch 1 on this CPU with the same session options (the edge agent's: one
intra-op thread, sequential, full graph optimisation, no CPU arena, no spinning). Latencies are
interleaved — one INT8 run, one FP32 run, over and over on real test inputs — so that other load on
the box hits both alike. The cloud model in PyTorch is timed in a second loop, taking turns with the
FP32 ONNX model (its 4 ms passes evict the caches the small edge models live in, which no agent
does between two requests). Accuracy is on the bundle's whole test split.

A sweep of session options for both ONNX models then says which settings are fastest here, and an
onnxruntime profile of each (agent session options) gives the median time per node of the optimised
graph, so that a latency ratio can be traced to the kernels that make it.
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shared.bench.common import BenchResult, Target, summarize
from shared.bench.models import BenchModels, EvalData

__all__ = ["SessionConfig", "AGENT_CONFIG", "make_session", "op_profile", "run_p1"]


@dataclass(frozen=True)
class SessionConfig:
    """The onnxruntime settings that can change CPU latency of a small CNN."""

    threads: int = 1
    opt_level: str = "all"  # basic | extended | all
    arena: bool = False
    parallel: bool = False
    spinning: bool = False

    @property
    def label(self) -> str:
        return (f"threads={self.threads} opt={self.opt_level} arena={'on' if self.arena else 'off'} "
                f"mode={'parallel' if self.parallel else 'sequential'} spin={'on' if self.spinning else 'off'}")


# What edge_agent.runtime uses today; the headline ratios are taken with it.
AGENT_CONFIG = SessionConfig()


def make_session(path: Path, cfg: SessionConfig, profile_prefix: str | None = None) -> Any:
    import onnxruntime as ort

    levels = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = cfg.threads
    opts.inter_op_num_threads = 2 if cfg.parallel else 1
    opts.execution_mode = ort.ExecutionMode.ORT_PARALLEL if cfg.parallel else ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = levels[cfg.opt_level]
    opts.enable_cpu_mem_arena = cfg.arena
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if cfg.spinning else "0")
    opts.log_severity_level = 3
    if profile_prefix is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def op_profile(path: Path, inputs: np.ndarray, runs: int, tmp: Path) -> list[dict[str, Any]]:
    """onnxruntime's own per-node kernel times (µs, median over ``runs`` batch-1 runs) of the optimised
    graph with the agent's session options, slowest first: which kernels a QDQ/QOperator model was fused
    into and where the time goes."""
    session = make_session(path, AGENT_CONFIG, profile_prefix=str(tmp / f"profile-{Path(path).stem}"))
    name = session.get_inputs()[0].name
    for i in range(runs):
        session.run(None, {name: np.ascontiguousarray(inputs[i % len(inputs)][None])})
    trace = session.end_profiling()
    try:
        events = json.loads(Path(trace).read_text())
    finally:
        os.remove(trace)
    times: dict[tuple[str, str], list[float]] = defaultdict(list)
    for ev in events:
        if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
            times[(ev["name"].removesuffix("_kernel_time"), ev["args"].get("op_name", "?"))].append(ev["dur"])
    rows = [{"node": node, "op": op, "median_us": float(np.median(d)), "calls": len(d)}
            for (node, op), d in times.items()]
    return sorted(rows, key=lambda r: -r["median_us"])


def _by_op(rows: list[dict[str, Any]]) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for r in rows:
        out[r["op"]] += r["median_us"]
    return {k: round(v, 1) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


def _logits(session: Any, x: np.ndarray, batch: int = 256) -> np.ndarray:
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)])


def _accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits, axis=1) == y))


def _interleaved_ms(
    runners: dict[str, tuple[Any, np.ndarray]], runs: int, warmup: int
) -> dict[str, np.ndarray]:
    """Per runner ``(fn, inputs)``, ``runs`` batch-1 wall times (ms) on its i-th input; the runners take
    turns in a rotating order, so drift in the box's load hits them all alike."""
    names = list(runners)
    times = {n: np.empty(runs) for n in names}
    for i in range(warmup):
        for n in names:
            fn, xs = runners[n]
            fn(np.ascontiguousarray(xs[i % len(xs)][None]))
    for i in range(runs):
        order = names[i % len(names):] + names[: i % len(names)]
        for n in order:
            fn, xs = runners[n]
            x = np.ascontiguousarray(xs[i % len(xs)][None])
            t0 = time.perf_counter()
            fn(x)
            times[n][i] = (time.perf_counter() - t0) * 1000.0
    return times


def _ort_runner(session: Any) -> Any:
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})


def sweep_configs() -> list[SessionConfig]:
    """Threads 1/2 × optimisation level × arena on/off × sequential/parallel (spinning off, as on the agent)."""
    return [
        SessionConfig(threads=t, opt_level=o, arena=a, parallel=p)
        for t, o, a, p in itertools.product((1, 2), ("basic", "extended", "all"), (False, True), (False, True))
    ]


def _sweep(paths: dict[str, Path], inputs: np.ndarray, runs: int, warmup: int) -> list[dict[str, Any]]:
    rows = []
    for cfg in sweep_configs():
        sessions = {k: make_session(p, cfg) for k, p in paths.items()}
        times = _interleaved_ms({k: (_ort_runner(s), inputs) for k, s in sessions.items()}, runs, warmup)
        row: dict[str, Any] = {"config": cfg.label, **{k: summarize(v) for k, v in times.items()}}
        row["int8_over_fp32_p50"] = round(row["int8"]["p50"] / row["fp32"]["p50"], 4)
        rows.append(row)
    return rows


def run_p1(
    models: BenchModels, data: EvalData, *, runs: int = 500, warmup: int = 50, sweep_runs: int = 150,
    torch_threads: int = 1,
) -> BenchResult:
    """Size, latency and accuracy of INT8 vs FP32 ONNX (plus PyTorch eager FP32 of the cloud model)."""
    import torch

    from cloud_hub.factory.quantize import export_onnx
    from shared.models import load_checkpoint

    manifest = models.bundle.manifest
    result = BenchResult("edge/p1", {
        "task": data.task, "bundle": f"{manifest.name}:{manifest.version}", "runs": runs, "warmup": warmup,
        "sweep_runs": sweep_runs, "session": AGENT_CONFIG.label, "torch_threads": torch_threads,
        "test_items": int(len(data.test_y)), "split_seed": data.seed, "limit": data.limit,
        "fp32": "the edge checkpoint exported to ONNX (opset of the factory), not quantized",
        "int8": "the bundle's model.onnx (static INT8 as shipped; format in 'quantization')",
        "torch": "cloud checkpoint, eager, torch.inference_mode, batch 1",
    })
    with tempfile.TemporaryDirectory(prefix="edgefed-bench-p1-") as tmp:
        edge = load_checkpoint(models.edge_checkpoint)
        fp32_path = export_onnx(edge.model, Path(tmp) / "fp32.onnx", manifest.input.shape, manifest.input.name)
        paths = {"int8": models.bundle.model_path, "fp32": fp32_path}
        sessions = {k: make_session(p, AGENT_CONFIG) for k, p in paths.items()}
        acc = {k: _accuracy(_logits(s, data.test_x), data.test_y) for k, s in sessions.items()}
        sizes = {k: Path(p).stat().st_size for k, p in paths.items()}

        cloud = load_checkpoint(models.cloud_checkpoint)
        cloud_spec = cloud.meta.input
        torch.set_num_threads(torch_threads)
        cloud_x = data.test_x
        if list(cloud_spec.shape[1:]) != list(manifest.input.shape[1:]):
            from shared.bench.models import load_eval_data

            cloud_x = load_eval_data(manifest.model_copy(update={"input": cloud_spec})).test_x
        cloud_model = cloud.model.eval()

        def torch_runner(x: np.ndarray) -> Any:
            with torch.inference_mode():
                return cloud_model(torch.from_numpy(x))

        # INT8 and FP32 take turns in one loop (the P1 ratio). The cloud model in PyTorch is timed in a
        # loop of its own, taking turns with the FP32 ONNX: between two edge inferences a real agent
        # never runs a 4 ms PyTorch model that evicts the caches, so it is kept out of the P1 pair.
        ort_runners = {k: (_ort_runner(s), data.test_x) for k, s in sessions.items()}
        times = _interleaved_ms(ort_runners, runs, warmup)
        with_torch = _interleaved_ms(
            {"fp32": ort_runners["fp32"], "torch_cloud_fp32": (torch_runner, cloud_x)}, runs, warmup
        )
        times["torch_cloud_fp32"] = with_torch["torch_cloud_fp32"]
        sweep = _sweep(paths, data.test_x, sweep_runs, max(10, warmup // 5))
        profiles = {k: op_profile(p, data.test_x, max(50, runs // 2), Path(tmp)) for k, p in paths.items()}

    lat = {k: summarize(v) for k, v in times.items()}
    size_ratio = sizes["int8"] / sizes["fp32"]
    lat_p50 = lat["int8"]["p50"] / lat["fp32"]["p50"]
    lat_p90 = lat["int8"]["p90"] / lat["fp32"]["p90"]
    drop_pt = 100.0 * (acc["fp32"] - acc["int8"])
    best = min(sweep, key=lambda r: r["int8"]["p50"])
    result.measurements = {
        "size_bytes": sizes,
        "accuracy": {k: round(v, 6) for k, v in acc.items()},
        "latency_ms": lat,
        "ratios": {
            "size_int8_over_fp32": round(size_ratio, 4),
            "latency_p50_int8_over_fp32": round(lat_p50, 4),
            "latency_p90_int8_over_fp32": round(lat_p90, 4),
            "latency_p50_int8_over_torch_cloud": round(lat["int8"]["p50"] / lat["torch_cloud_fp32"]["p50"], 4),
            "latency_p50_fp32_in_torch_loop_ms": round(float(np.median(with_torch["fp32"])), 4),
            "accuracy_drop_pt": round(drop_pt, 3),
        },
        "quantization": (manifest.provenance.compression if manifest.provenance else {}),
        "session_sweep": sweep,
        "op_profile_us": {k: {"total": round(sum(r["median_us"] for r in rows), 1), "by_op": _by_op(rows),
                              "nodes": rows} for k, rows in profiles.items()},
        "best_int8_session": {"config": best["config"], "int8_p50_ms": best["int8"]["p50"],
                              "int8_over_fp32_p50": best["int8_over_fp32_p50"]},
    }
    result.targets = [
        Target("P1", "INT8/FP32 size", round(size_ratio, 4), 0.30, "<=", "x"),
        Target("P1", "INT8/FP32 latency p50 (batch 1)", round(lat_p50, 4), 0.60, "<=", "x"),
        Target("P1", "INT8/FP32 latency p90 (batch 1)", round(lat_p90, 4), 0.60, "<=", "x"),
        Target("P1", "accuracy drop INT8 vs FP32", round(drop_pt, 3), 1.0, "<=", "pt"),
    ]
    flags = result.machine
    if flags.get("avx2") and not flags.get("vnni"):
        result.notes.append("CPU has AVX2 but no VNNI: onnxruntime's U8S8 INT8 kernels have no fast dot-product "
                            "instruction here, so INT8 can be slower than FP32 on small CNNs")
    result.notes.append(f"fastest INT8 session options: {best['config']} ({best['int8']['p50']} ms p50, "
                        f"{best['int8_over_fp32_p50']}x FP32 with the same options)")
    return result
