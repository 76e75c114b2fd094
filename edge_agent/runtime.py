"""onnxruntime session for one verified bundle, tuned for a small CPU box.

The session is created only from a ``VerifiedBundle`` (``shared.bundle.open_bundle`` checked its
hash and signature). Every input is checked against the manifest's ``InputSpec`` before it reaches
onnxruntime, so a wrong shape, dtype or a NaN gets an ``InputError`` that names the problem rather
than an opaque kernel error or a silently meaningless answer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from shared.bundle import InputSpec, Manifest, VerifiedBundle

__all__ = ["EdgeRuntime", "InputError", "ModelError", "softmax"]

log = logging.getLogger(__name__)


class ModelError(RuntimeError):
    """A verified bundle's model cannot be served: onnxruntime refused it, or it contradicts its manifest."""


class InputError(ValueError):
    """An input tensor does not match the model's input spec; nothing was run."""


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax over the last axis, stable for large logits."""
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def _session_options(intra_op_threads: int) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # The default CPU arena can grow without bound on some models (ORT #11627); a steady RSS matters
    # more on an edge box than the few microseconds an arena saves per request.
    opts.enable_cpu_mem_arena = False
    # Spinning worker threads burn a core between requests on a 2-core box.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return opts


@dataclass(frozen=True)
class _InputShape:
    """The model's declared input: None where a dimension is symbolic (e.g. a dynamic batch)."""

    name: str
    dims: tuple[int | None, ...]


# Inference passes on a zero input before a model serves (see ``EdgeRuntime._warm_up``).
_WARM_UP_RUNS = 3


class EdgeRuntime:
    """Runs one bundle's model; ``predict`` returns class probabilities. Thread-safe (ORT sessions are)."""

    def __init__(self, session: ort.InferenceSession, manifest: Manifest, model_input: _InputShape) -> None:
        self._session = session
        self.manifest = manifest
        self._input = model_input
        self._output_name = session.get_outputs()[0].name

    @classmethod
    def load(cls, bundle: VerifiedBundle, *, intra_op_threads: int = 1) -> EdgeRuntime:
        """Create the session for ``bundle``; ModelError says why it cannot be served."""
        manifest = bundle.manifest
        what = f"{manifest.name}:{manifest.version}"
        try:
            session = ort.InferenceSession(
                str(bundle.model_path),
                sess_options=_session_options(intra_op_threads),
                providers=["CPUExecutionProvider"],
            )
        except Exception as exc:  # onnxruntime raises its own non-standard exception types
            raise ModelError(f"onnxruntime cannot load model {what}: {exc}") from exc
        model_input = _check_model_matches_spec(session, manifest.input, len(manifest.labels), what)
        runtime = cls(session, manifest, model_input)
        runtime._warm_up(what)
        log.info("loaded model %s (%s, %d intra-op thread(s))", what, bundle.model_path, intra_op_threads)
        return runtime

    def _warm_up(self, what: str) -> None:
        """Run the model before it serves: onnxruntime initialises kernels and buffers on the first run
        (several ms, ~7 MiB), which would otherwise land on the first request after a start or a swap;
        a model that loads but cannot run is refused here, while the old one still serves."""
        x = np.zeros([1, *self.spec.shape[1:]], dtype=np.dtype(self.spec.dtype))
        try:
            for _ in range(_WARM_UP_RUNS):
                self.predict(x)
        except ModelError:
            raise
        except Exception as exc:  # onnxruntime raises its own non-standard exception types
            raise ModelError(f"model {what} loads but fails on a zero input: {exc}") from exc

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def spec(self) -> InputSpec:
        return self.manifest.input

    @property
    def labels(self) -> list[str]:
        return self.manifest.labels

    def validate(self, tensor: np.ndarray) -> np.ndarray:
        """Return ``tensor`` as a contiguous float32 array, or raise InputError naming the problem."""
        if not isinstance(tensor, np.ndarray):
            raise InputError(f"input must be a numpy array, got {type(tensor).__name__}")
        expected = self.spec.shape
        if tensor.dtype != np.dtype(self.spec.dtype):
            raise InputError(f"input dtype is {tensor.dtype}; the model expects {self.spec.dtype}")
        if tensor.ndim != len(expected):
            raise InputError(
                f"input has shape {list(tensor.shape)} ({tensor.ndim} dimensions); the model expects "
                f"{expected} ({self.spec.layout})"
            )
        batch_fixed = self._input.dims[0]
        if tensor.shape[0] < 1 or (batch_fixed is not None and tensor.shape[0] != batch_fixed):
            allowed = f"exactly {batch_fixed}" if batch_fixed is not None else "at least 1"
            raise InputError(f"input batch size is {tensor.shape[0]}; the model needs {allowed}")
        if list(tensor.shape[1:]) != list(expected[1:]):
            raise InputError(
                f"input has shape {list(tensor.shape)}; the model expects [N, {', '.join(map(str, expected[1:]))}]"
            )
        if not np.isfinite(tensor).all():
            bad = int(tensor.size - np.isfinite(tensor).sum())
            raise InputError(f"input holds {bad} NaN or infinite value(s); send finite numbers")
        return np.ascontiguousarray(tensor)

    def predict(self, tensor: np.ndarray) -> np.ndarray:
        """Class probabilities (N×K float32) for a validated input batch."""
        x = self.validate(tensor)
        (logits,) = self._session.run([self._output_name], {self._input.name: x})
        logits = np.asarray(logits)
        if logits.ndim != 2 or logits.shape != (x.shape[0], len(self.labels)):
            raise ModelError(
                f"model {self.name}:{self.version} produced output of shape {list(logits.shape)}; "
                f"its manifest lists {len(self.labels)} labels, so [N, {len(self.labels)}] were expected"
            )
        return softmax(logits)


def _check_model_matches_spec(session: ort.InferenceSession, spec: InputSpec, n_labels: int, what: str) -> _InputShape:
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ModelError(f"model {what} has {len(inputs)} inputs; edge models must take exactly one")
    inp = inputs[0]
    if inp.name != spec.name:
        raise ModelError(f"model {what}'s input is named {inp.name!r}; its manifest says {spec.name!r}")
    if inp.type != "tensor(float)":
        raise ModelError(f"model {what}'s input type is {inp.type}; the manifest says float32")
    outputs = session.get_outputs()
    last = outputs[0].shape[-1] if outputs and outputs[0].shape else None
    if isinstance(last, int) and last > 0 and n_labels != last:
        raise ModelError(f"model {what} outputs {last} classes; its manifest lists {n_labels} labels")
    dims = tuple(d if isinstance(d, int) and d > 0 else None for d in inp.shape)
    if len(dims) != len(spec.shape):
        raise ModelError(f"model {what}'s input has rank {len(dims)}; its manifest says shape {spec.shape}")
    for i, (model_dim, spec_dim) in enumerate(zip(dims[1:], spec.shape[1:], strict=True), start=1):
        if model_dim is not None and model_dim != spec_dim:
            raise ModelError(f"model {what}'s input dimension {i} is {model_dim}; its manifest says shape {spec.shape}")
    return _InputShape(name=inp.name, dims=dims)
