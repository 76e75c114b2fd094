"""Measure ONNX models the way the edge runs them: onnxruntime on CPU, one thread, batch 1 latency."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "ModelReport",
    "make_session",
    "onnx_logits",
    "softmax",
    "accuracy",
    "measure_latency_ms",
    "confidence_quantiles",
    "score_quantiles",
    "evaluate_model",
]


@dataclass(frozen=True)
class ModelReport:
    accuracy: float
    size_bytes: int
    latency_ms: float
    logits: np.ndarray


def make_session(path: Path, threads: int = 1) -> Any:
    """An onnxruntime CPU session with full graph optimisation (QDQ fusion needs it)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def onnx_logits(session: Any, inputs: np.ndarray, batch_size: int = 256) -> np.ndarray:
    name = session.get_inputs()[0].name
    outs = [session.run(None, {name: inputs[i : i + batch_size]})[0] for i in range(0, len(inputs), batch_size)]
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    if len(labels) == 0:
        raise ValueError("cannot measure accuracy on an empty holdout")
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def measure_latency_ms(session: Any, sample: np.ndarray, runs: int = 200, warmup: int = 20) -> float:
    """Median wall time of ``session.run`` on one batch-1 input, in milliseconds."""
    name = session.get_inputs()[0].name
    x = np.ascontiguousarray(sample[:1], dtype=np.float32)
    for _ in range(warmup):
        session.run(None, {name: x})
    times = np.empty(runs)
    for i in range(runs):
        t0 = time.perf_counter()
        session.run(None, {name: x})
        times[i] = time.perf_counter() - t0
    return float(np.median(times) * 1000.0)


def score_quantiles(logits: np.ndarray, score: str = "confidence", n: int = 101) -> list[float]:
    """Quantiles 0, 1/(n-1), ..., 1 of a certainty score (``edge_agent.scores``: confidence, margin,
    entropy) over the given predictions; the agent's escalation policies calibrate from these."""
    from edge_agent.scores import score_fn

    if len(logits) == 0:
        raise ValueError(f"cannot compute {score} quantiles of no predictions")
    fn = score_fn(score)
    values = np.array([fn(p) for p in softmax(logits.astype(np.float64))])
    return [round(float(q), 6) for q in np.quantile(values, np.linspace(0.0, 1.0, n))]


def confidence_quantiles(logits: np.ndarray, n: int = 101) -> list[float]:
    """Quantiles of the max softmax probability (for escalation thresholds)."""
    return score_quantiles(logits, "confidence", n)


def evaluate_model(
    path: Path, inputs: np.ndarray, labels: np.ndarray, *, latency_runs: int = 200, threads: int = 1
) -> ModelReport:
    """Accuracy on ``inputs``/``labels``, file size, and batch-1 median latency of one ONNX model."""
    session = make_session(path, threads)
    logits = onnx_logits(session, inputs)
    return ModelReport(
        accuracy=accuracy(logits, labels),
        size_bytes=Path(path).stat().st_size,
        latency_ms=measure_latency_ms(session, inputs, runs=latency_runs),
        logits=logits,
    )
