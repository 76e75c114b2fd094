"""The cloud model on a CPU through onnxruntime: the same network and weights, fewer per-batch costs.

On a CPU, PyTorch eager pays tens of microseconds of dispatch per operator, which for the small
batches a hub sees (one to a few dozen escalations) costs more than the arithmetic: a 20-layer CNN
takes ~2 ms at batch 1 in eager mode and ~0.2 ms in onnxruntime. ``OrtRunner.from_module`` exports
the loaded network (softmax included) to ONNX in memory with a dynamic batch axis, opens an
onnxruntime session with the hub's CPU thread count, and accepts it only if its probabilities match
PyTorch's on random inputs of two batch sizes (``PARITY_ATOL``); otherwise it raises
``RuntimeUnavailable`` and the hub serves the model with PyTorch, saying why in its log.
Nothing is written to disk; the checkpoint stays the model of record.
"""

from __future__ import annotations

import io
import logging
import os
import warnings

import numpy as np
import torch

__all__ = ["OrtRunner", "RuntimeUnavailable", "PARITY_ATOL", "cpu_threads"]

log = logging.getLogger(__name__)

PARITY_ATOL = 1e-4  # largest difference in any class probability accepted between the two runtimes
_OPSET = 17


class RuntimeUnavailable(RuntimeError):
    """The network cannot run in onnxruntime with the same results; the message says why."""


def cpu_threads(requested: int) -> int:
    """Threads for one CPU model: ``requested`` if > 0, else half the usable cores (at least 1),
    leaving the rest to the broker connections, the API and the request handling."""
    if requested > 0:
        return requested
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 1
    return max(1, usable // 2)


class _WithSoftmax(torch.nn.Module):
    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(x).float(), dim=1)


class OrtRunner:
    """An onnxruntime session computing N×C×H×W float32 → N×K softmax probabilities."""

    def __init__(self, session, input_name: str) -> None:  # noqa: ANN001 - onnxruntime.InferenceSession
        self._session = session
        self._input = input_name

    @classmethod
    def from_module(cls, net: torch.nn.Module, input_chw: tuple[int, int, int], threads: int) -> OrtRunner:
        """Export ``net`` (eval mode, on the CPU) and check parity; raise RuntimeUnavailable on any failure."""
        try:
            import onnxruntime as ort
        except ImportError as exc:  # the hub extra installs it; a trimmed install may not have it
            raise RuntimeUnavailable(f"onnxruntime is not installed ({exc})") from None
        model = _WithSoftmax(net).eval()
        example = torch.zeros((2, *input_chw), dtype=torch.float32)
        buf = io.BytesIO()
        try:
            with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    model, (example,), buf, input_names=["x"], output_names=["probs"],
                    dynamic_axes={"x": {0: "n"}, "probs": {0: "n"}}, opset_version=_OPSET, dynamo=False,
                )
        except Exception as exc:  # noqa: BLE001 - any exporter failure means: serve with PyTorch
            raise RuntimeUnavailable(f"ONNX export failed: {type(exc).__name__}: {exc}") from None
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            session = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001
            raise RuntimeUnavailable(f"onnxruntime could not load the exported network: {exc}") from None
        runner = cls(session, session.get_inputs()[0].name)
        runner._check_parity(model, input_chw)
        return runner

    def run(self, batch: np.ndarray) -> np.ndarray:
        """N×C×H×W float32 (contiguous) → N×K float32 probabilities."""
        return self._session.run(None, {self._input: batch})[0]

    def _check_parity(self, model: torch.nn.Module, input_chw: tuple[int, int, int]) -> None:
        rng = np.random.default_rng(0)
        for n in (1, 5):
            x = rng.standard_normal((n, *input_chw)).astype(np.float32)
            with torch.inference_mode():
                expected = model(torch.from_numpy(x)).numpy()
            try:
                got = self.run(x)
            except Exception as exc:  # noqa: BLE001
                raise RuntimeUnavailable(f"onnxruntime failed on a batch of {n}: {exc}") from None
            if got.shape != expected.shape:
                raise RuntimeUnavailable(
                    f"onnxruntime output shape {got.shape} differs from PyTorch's {expected.shape}"
                )
            diff = float(np.max(np.abs(got - expected)))
            if not diff <= PARITY_ATOL:
                raise RuntimeUnavailable(
                    f"onnxruntime probabilities differ from PyTorch's by {diff:.2e} at batch {n} "
                    f"(accepted: {PARITY_ATOL:.0e})"
                )
