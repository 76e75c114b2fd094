"""The active cloud model per task behind one dynamic batcher (``cloud_hub.inference.batcher``).

``submit(task, tensor[, deadline_ms]) -> Future[Prediction]`` is the whole interface callers see: the
MQTT gateway and the REST predict route both use it. Input is checked at submit (unknown task, bad
shape or dtype are refused at once); the batcher groups queued requests of one task into batches
and this service runs each batch through the task's model in one forward pass. A model becomes
active only after it has been warmed on every batch size class, so readiness (``has_models``) never
reports a model whose first real request would pay the cold start.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cloud_hub.errors import HubServiceError, Unavailable
from cloud_hub.inference.batcher import BatchFailed, DynamicBatcher
from cloud_hub.inference.model import BadTensor, LoadedModel, ModelSpec, UnknownTask, load_model
from cloud_hub.metrics import HubMetrics

__all__ = ["InferenceService", "Prediction"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    """The full model's answer for the N samples of one request."""

    task: str
    model_name: str
    model_version: str
    label_ids: list[int]
    labels: list[str]
    confidences: list[float]
    probabilities: np.ndarray  # N×K float32
    inference_ms: float
    batch_size: int  # samples in the batch this request ran in (padding not counted)


class InferenceService:
    """Owns the loaded models and the batcher; ``start()`` starts it, ``stop()`` drains and joins it."""

    def __init__(
        self,
        device: str = "cpu",
        max_batch_size: int = 32,
        max_queue: int = 10_000,
        metrics: HubMetrics | None = None,
        *,
        max_queue_delay_ms: float = 2.0,
        request_deadline_ms: float | None = None,
        warmup_batches: int = 2,
        cpu_runtime: str = "onnxruntime",
        cpu_threads: int = 0,
    ) -> None:
        if warmup_batches < 0:
            raise ValueError(f"warmup_batches must be >= 0, got {warmup_batches}")
        self.device = device
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.warmup_batches = warmup_batches
        self.cpu_runtime = cpu_runtime
        self.cpu_threads = cpu_threads
        self._metrics = metrics
        self._models: dict[str, LoadedModel] = {}
        self._models_lock = threading.Lock()
        self._batcher: DynamicBatcher[Prediction] = DynamicBatcher(
            self._execute,
            max_batch_size=max_batch_size,
            max_queue_delay_ms=max_queue_delay_ms,
            max_queue=max_queue,
            deadline_ms=request_deadline_ms,
            metrics=metrics,
            name="hub-inference",
        )

    @property
    def batcher(self) -> DynamicBatcher[Prediction]:
        return self._batcher

    # --- models ----------------------------------------------------------------------------
    def load(self, source: Path | bytes) -> ModelSpec:
        """Load a cloud checkpoint, warm it, make it the active model for its task (raises InvalidInput)."""
        return self.activate(
            load_model(source, self.device, cpu_runtime=self.cpu_runtime, cpu_threads=self.cpu_threads)
        )

    def activate(self, model: LoadedModel) -> ModelSpec:
        """Warm ``model`` on every batch size class, then make it the active model for its task."""
        t0 = time.perf_counter()
        batches = model.warm_up(self.max_batch_size, self.warmup_batches) if self.warmup_batches else 0
        with self._models_lock:
            previous = self._models.get(model.spec.task)
            self._models[model.spec.task] = model
            count = len(self._models)
        if self._metrics is not None:
            self._metrics.models_loaded.set(count)
        old = f" (was {previous.spec.name}:{previous.spec.version})" if previous else ""
        log.info(
            "cloud model %s:%s active for task %r on %s (%s) after %d warm-up batches in %.2f s%s",
            model.spec.name,
            model.spec.version,
            model.spec.task,
            self.device,
            model.runtime,
            batches,
            time.perf_counter() - t0,
            old,
        )
        return model.spec

    def specs(self) -> dict[str, ModelSpec]:
        with self._models_lock:
            return {task: m.spec for task, m in self._models.items()}

    def has_models(self) -> bool:
        """True once at least one model is active, i.e. loaded and warmed."""
        with self._models_lock:
            return bool(self._models)

    def _model(self, task: str) -> LoadedModel:
        model = self._models.get(task)  # one dict read is atomic; the lock guards swaps and listings
        if model is None:
            have = ", ".join(repr(t) for t in sorted(self.specs())) or "none"
            raise UnknownTask(
                f"no cloud model is loaded for task {task!r} (loaded: {have}); push a checkpoint for it"
            )
        return model

    # --- requests --------------------------------------------------------------------------
    def submit(self, task: str, tensor: np.ndarray, deadline_ms: float | None = None) -> Future[Prediction]:
        """Queue N×C×H×W float32 samples for ``task``.

        Raises at once: UnknownTask, BadTensor, Unavailable (not running) or QueueFull (backpressure).
        The future fails with DeadlineExceeded when the request waited past ``deadline_ms`` (default:
        the service's ``request_deadline_ms``) and was therefore not computed.
        """
        return self._batcher.submit(task, self._checked(task, tensor), deadline_ms)

    def submit_callback(
        self,
        task: str,
        tensor: np.ndarray,
        callback: Callable[[Prediction | BaseException], None],
        deadline_ms: float | None = None,
        *,
        inline_when_idle: bool = False,
    ) -> None:
        """As ``submit``, answering ``callback(prediction_or_error)`` on the inference thread instead of
        through a Future (the MQTT gateway); raises at once as ``submit`` does. ``inline_when_idle``:
        see ``DynamicBatcher.submit_callback``."""
        self._batcher.submit_callback(
            task, self._checked(task, tensor), callback, deadline_ms, inline_when_idle=inline_when_idle
        )

    def submit_async(
        self, task: str, tensor: np.ndarray, deadline_ms: float | None = None
    ) -> asyncio.Future[Prediction]:
        """As ``submit``, from a running event loop (the REST route): an asyncio future of that loop,
        answered once per batch for all of the loop's requests rather than one wake-up per request."""
        return self._batcher.submit_async(task, self._checked(task, tensor), deadline_ms)

    def _checked(self, task: str, tensor: np.ndarray) -> np.ndarray:
        if not self._batcher.running:
            raise self._refused(
                Unavailable("inference is not running (the hub is starting or stopping); retry shortly")
            )
        try:
            return self._model(task).check_input(tensor)
        except HubServiceError as exc:
            raise self._refused(exc) from None

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._batcher.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish what is queued, then stop the worker; later submits raise Unavailable."""
        self._batcher.stop(timeout)

    # --- batches ---------------------------------------------------------------------------
    def _execute(self, task: str, tensors: list[np.ndarray]) -> list[Prediction | BaseException]:
        """One forward pass for the batch; one Prediction (or error) per request, in order."""
        model = self._model(task)  # raises UnknownTask for every waiter if the task disappeared
        spec = model.spec
        out: list[Prediction | BaseException | None] = [None] * len(tensors)
        runnable: list[int] = []
        for i, t in enumerate(tensors):
            if tuple(t.shape[1:]) == spec.input_chw:
                runnable.append(i)
            else:  # the model was swapped for one with another input since submit()
                out[i] = BadTensor(
                    f"tensor shape {list(t.shape)} does not fit model {spec.name}:{spec.version}, which now "
                    f"takes N×{spec.input_chw[0]}×{spec.input_chw[1]}×{spec.input_chw[2]}"
                )
        if runnable:
            xs = [tensors[i] for i in runnable]
            n = sum(int(x.shape[0]) for x in xs)
            t0 = time.perf_counter()
            probs = model.run(xs)
            elapsed_ms = (time.perf_counter() - t0) * 1000.0
            if probs.ndim != 2 or probs.shape[0] != n:
                raise BatchFailed(
                    f"model {spec.name}:{spec.version} returned {list(probs.shape)} outputs for {n} input "
                    "samples; one output row per sample is required"
                )
            ids = probs.argmax(axis=1)
            conf = probs[np.arange(n), ids]
            pos = 0
            for i, x in zip(runnable, xs, strict=True):
                k = int(x.shape[0])
                row_ids = [int(j) for j in ids[pos : pos + k]]
                out[i] = Prediction(
                    task=task,
                    model_name=spec.name,
                    model_version=spec.version,
                    label_ids=row_ids,
                    labels=[spec.labels[j] for j in row_ids],
                    confidences=[float(c) for c in conf[pos : pos + k]],
                    probabilities=probs[pos : pos + k],
                    inference_ms=elapsed_ms,
                    batch_size=n,
                )
                pos += k
        return [r for r in out if r is not None]

    def _refused(self, exc: HubServiceError) -> HubServiceError:
        if self._metrics is not None:
            self._metrics.inference_errors.labels(exc.kind).inc()
        return exc
