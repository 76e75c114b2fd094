"""One cloud model ready to run: a network on its device, with input checks and a reused staging area.

``run(tensors)`` copies the requests' samples straight into one preallocated input buffer (pinned
host memory on CUDA), moves it to the device in one copy, and brings the probabilities back into a
pinned output buffer: no per-request allocation or host↔device transfer. On CUDA a batch is padded
to its size class (powers of two up to the largest batch), so the few shapes the GPU ever sees are
the ones ``warm_up`` ran before the model went live; outputs are cut back to the real sample count.

On a CPU the model runs in onnxruntime by default (``cloud_hub.inference.cpu_runtime``: the same
network exported in memory, accepted only if its probabilities match PyTorch's), with PyTorch as the
fallback and as an explicit choice (``cpu_runtime="torch"``).

Loading also runs one forward pass on the checkpoint's declared input shape, so a checkpoint whose
weights or metadata do not fit its network is refused at push time, not at the first escalation.
Only torch and numpy are imported here; checkpoints (which need pydantic) load inside ``load_model``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from contextlib import nullcontext as _nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cloud_hub.errors import InvalidInput, NotFound
from cloud_hub.inference.cpu_runtime import OrtRunner, RuntimeUnavailable
from cloud_hub.inference.cpu_runtime import cpu_threads as cpu_threads_for

__all__ = ["BadTensor", "UnknownTask", "ModelSpec", "LoadedModel", "load_model", "size_classes", "CPU_RUNTIMES"]

CPU_RUNTIMES = ("onnxruntime", "torch")

log = logging.getLogger(__name__)

# Every CUDA model of the process runs and captures under this lock: a graph capture while another
# thread launches work (a model pushed while the old one serves) could break either.
_CUDA_LOCK = threading.Lock()


class BadTensor(InvalidInput):
    """A tensor does not fit the model's input (shape or dtype)."""

    kind = "bad_shape"


class UnknownTask(NotFound):
    """No cloud model is loaded for the requested task."""

    kind = "unknown_task"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    version: str
    task: str
    labels: tuple[str, ...]
    input_chw: tuple[int, int, int]


def size_classes(max_batch_size: int) -> tuple[int, ...]:
    """The batch sizes a GPU batch is padded to: 1, 2, 4, ... below ``max_batch_size``, then it."""
    out, s = [], 1
    while s < max_batch_size:
        out.append(s)
        s *= 2
    return (*out, max_batch_size)


class LoadedModel:
    """A network in eval mode on ``device``; ``run``/``predict`` map N×C×H×W float32 to N×K probabilities.

    ``meta`` is the checkpoint's metadata when the model came from one (None for a bare network).
    On CUDA, ``warm_up`` also captures one CUDA graph per size class (``cuda_graphs``): a batch is
    then one graph replay instead of dozens of kernel launches, each of which releases Python's GIL
    and may wait up to a switch interval to get it back while other threads are busy.
    """

    def __init__(
        self,
        net: torch.nn.Module,
        spec: ModelSpec,
        device: torch.device | str,
        meta: Any = None,
        *,
        cuda_graphs: bool = True,
        cpu_runtime: str = "torch",
        cpu_threads: int = 0,
    ) -> None:
        if cpu_runtime not in CPU_RUNTIMES:
            raise ValueError(f"cpu_runtime must be one of {', '.join(CPU_RUNTIMES)}, got {cpu_runtime!r}")
        self.spec = spec
        self.meta = meta
        self.device = torch.device(device)
        self._net = net.eval().to(self.device)
        self._cuda = self.device.type == "cuda"
        if self._cuda:
            torch.backends.cudnn.benchmark = True  # shapes are limited to the size classes, all warmed
        self._classes: tuple[int, ...] = ()
        self._lock = threading.Lock()
        self._capacity = 0
        self._host_in: torch.Tensor | None = None
        self._host_in_np: np.ndarray | None = None
        self._dev_in: torch.Tensor | None = None
        self._host_out: torch.Tensor | None = None
        self._use_graphs = cuda_graphs and self._cuda
        # size class -> (graph, its static input, its static output); inputs live in their own buffer
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self._ort: OrtRunner | None = None
        if not self._cuda and cpu_runtime == "onnxruntime":
            try:
                self._ort = OrtRunner.from_module(self._net, spec.input_chw, cpu_threads_for(cpu_threads))
            except RuntimeUnavailable as exc:
                log.warning("model %s runs in PyTorch on the CPU: %s", self._ref, exc)

    @property
    def runtime(self) -> str:
        """What computes a batch: onnxruntime, torch, or torch+cuda-graphs."""
        if self._ort is not None:
            return "onnxruntime"
        return "torch+cuda-graphs" if self._graphs else "torch"

    def check_input(self, tensor: np.ndarray) -> np.ndarray:
        """Return ``tensor`` as contiguous N×C×H×W float32, or raise BadTensor saying what is wrong."""
        if tensor.dtype != np.float32:
            raise BadTensor(
                f"tensor dtype is {tensor.dtype}; model {self._ref} takes float32", kind="bad_dtype"
            )
        if tensor.ndim == 3:
            tensor = tensor[None]
        c, h, w = self.spec.input_chw
        if tensor.ndim != 4 or tuple(tensor.shape[1:]) != (c, h, w) or tensor.shape[0] < 1:
            raise BadTensor(
                f"tensor shape {list(tensor.shape)} does not fit model {self._ref}, which takes N×{c}×{h}×{w}"
            )
        return np.ascontiguousarray(tensor)

    # --- running ---------------------------------------------------------------------------
    def set_size_classes(self, classes: Sequence[int]) -> None:
        """Batch sizes CUDA batches are padded up to (see ``size_classes``); none means no padding."""
        self._classes = tuple(sorted(set(int(c) for c in classes)))

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """N×C×H×W float32 (already checked) → N×K float32 probabilities."""
        return self.run([batch])

    @torch.inference_mode()
    def run(self, tensors: Sequence[np.ndarray]) -> np.ndarray:
        """Run the samples of several checked requests as one batch; rows come back in the same order."""
        n = sum(int(t.shape[0]) for t in tensors)
        padded = next((c for c in self._classes if c >= n), n) if self._cuda else n
        with _CUDA_LOCK if self._cuda else self._lock:  # one batch at a time: staging buffers are reused
            host_np = self._staging(padded)
            pos = 0
            for t in tensors:
                k = int(t.shape[0])
                host_np[pos : pos + k] = t
                pos += k
            if self._cuda:
                assert self._host_in is not None and self._dev_in is not None
                graph = self._graphs.get(padded)
                if graph is not None:
                    graph[1].copy_(self._host_in[:padded], non_blocking=True)
                    graph[0].replay()
                    probs = graph[2]
                else:
                    x = self._dev_in[:padded]
                    x.copy_(self._host_in[:padded], non_blocking=True)
                    probs = torch.softmax(self._net(x).float(), dim=1)
                out = self._out_buffer(probs.shape[1])[:padded]
                out.copy_(probs, non_blocking=True)
                torch.cuda.current_stream(self.device).synchronize()
                return out[:n].numpy().copy()
            if self._ort is not None:
                return self._ort.run(host_np[:n])
            x = torch.from_numpy(host_np[:n])
            return torch.softmax(self._net(x).float(), dim=1).numpy()

    @property
    def graph_sizes(self) -> tuple[int, ...]:
        """Size classes that run as a captured CUDA graph."""
        return tuple(sorted(self._graphs))

    def warm_up(self, max_batch_size: int, rounds: int = 2) -> int:
        """Run ``rounds`` batches of each size class up to ``max_batch_size`` (then, on CUDA, capture a
        graph per class); return the batches run."""
        classes = size_classes(max_batch_size)
        self.set_size_classes(classes)
        c, h, w = self.spec.input_chw
        done = 0
        # On CUDA the warm-up runs on a side stream, as graph capture requires.
        stream = torch.cuda.Stream(self.device) if self._cuda else None
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream) if stream is not None else _nullcontext():
            for size in classes:
                x = np.zeros((size, c, h, w), dtype=np.float32)
                for _ in range(rounds):
                    self.run([x])
                    done += 1
        if stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(stream)
            if self._use_graphs and rounds:
                self._capture(classes)
        return done

    @torch.inference_mode()
    def _capture(self, classes: Sequence[int]) -> None:
        """One CUDA graph per size class, largest first, sharing one memory pool; eager if that fails."""
        with _CUDA_LOCK:
            static_in = torch.zeros((max(classes), *self.spec.input_chw), dtype=torch.float32, device=self.device)
            torch.cuda.synchronize(self.device)
            graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
            pool = None
            try:
                for size in sorted(classes, reverse=True):
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g, pool=pool, capture_error_mode="thread_local"):
                        probs = torch.softmax(self._net(static_in[:size]).float(), dim=1)
                    pool = g.pool()
                    graphs[size] = (g, static_in[:size], probs)
                for g, _, _ in graphs.values():  # the first replay uploads the graph: not a real request's cost
                    g.replay()
                torch.cuda.synchronize(self.device)
            except RuntimeError as exc:
                log.warning("model %s runs without CUDA graphs: capture failed: %s", self._ref, exc)
                torch.cuda.synchronize(self.device)
                return
            self._graphs = graphs

    def _staging(self, rows: int) -> np.ndarray:
        """The host input buffer with room for ``rows`` samples (grown, never shrunk; pinned on CUDA)."""
        if rows > self._capacity:
            cap = max(rows, self._classes[-1] if self._classes else 1)
            shape = (cap, *self.spec.input_chw)
            self._host_in = torch.zeros(shape, dtype=torch.float32, pin_memory=self._cuda)
            self._host_in_np = self._host_in.numpy()
            if self._cuda:
                self._dev_in = torch.empty(shape, dtype=torch.float32, device=self.device)
            self._host_out = None
            self._capacity = cap
        assert self._host_in_np is not None
        return self._host_in_np

    def _out_buffer(self, classes: int) -> torch.Tensor:
        """The pinned output buffer, ``capacity``×``classes``."""
        if self._host_out is None or self._host_out.shape[1] != classes:
            self._host_out = torch.empty((self._capacity, classes), dtype=torch.float32, pin_memory=True)
        return self._host_out

    @property
    def _ref(self) -> str:
        return f"{self.spec.name}:{self.spec.version}"


def load_model(
    source: Path | bytes, device: str = "cpu", *, cpu_runtime: str = "onnxruntime", cpu_threads: int = 0
) -> LoadedModel:
    """Load a cloud checkpoint onto ``device`` and probe it; raise InvalidInput naming the problem.
    On a CPU, ``cpu_runtime`` picks onnxruntime (PyTorch if the export does not match) or torch,
    ``cpu_threads`` its threads (0: half the usable cores)."""
    from shared.models import CheckpointError, load_checkpoint  # needs pydantic; the batcher alone does not

    try:
        ckpt = load_checkpoint(source, map_location=device)
    except CheckpointError as exc:
        raise InvalidInput(f"checkpoint refused: {exc}", kind="bad_checkpoint") from None
    meta = ckpt.meta
    if meta.role != "cloud":
        raise InvalidInput(
            f"checkpoint {meta.name}:{meta.version} has role {meta.role!r}; the hub serves "
            "only cloud checkpoints (push edge models as signed bundles)",
            kind="bad_checkpoint",
        )
    spec = ModelSpec(
        name=meta.name,
        version=meta.version,
        task=meta.task,
        labels=tuple(meta.labels),
        input_chw=(meta.input.channels, meta.input.height, meta.input.width),
    )
    model = LoadedModel(ckpt.model, spec, device, meta, cpu_runtime=cpu_runtime, cpu_threads=cpu_threads)
    c, h, w = spec.input_chw
    try:
        probs = model.predict(np.zeros((1, c, h, w), dtype=np.float32))
    except RuntimeError as exc:
        raise InvalidInput(
            f"checkpoint {model._ref}: a forward pass on its declared input 1×{c}×{h}×{w} failed: {exc}",
            kind="bad_checkpoint",
        ) from None
    if probs.shape != (1, len(spec.labels)):
        raise InvalidInput(
            f"checkpoint {model._ref} outputs {list(probs.shape[1:])} classes per sample but declares "
            f"{len(spec.labels)} labels",
            kind="bad_checkpoint",
        )
    return model
