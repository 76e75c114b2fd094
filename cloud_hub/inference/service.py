"""The active cloud model per task, and one worker thread that runs queued requests in batches.

``submit(task, tensor) -> Future[Prediction]`` is the whole interface callers see: the MQTT gateway
and the REST predict route both use it, so a smarter dynamic batcher can replace the worker without
touching them. The worker takes whatever is queued, up to ``max_batch_size`` samples, groups it by
task and runs each group as one forward pass.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cloud_hub.errors import HubServiceError, Unavailable
from cloud_hub.inference.model import LoadedModel, ModelSpec, UnknownTask, load_model
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
    batch_size: int


@dataclass
class _Item:
    task: str
    tensor: np.ndarray
    future: Future[Prediction]

    @property
    def n(self) -> int:
        return int(self.tensor.shape[0])


_STOP = object()


class InferenceService:
    """Owns the loaded models and the worker thread; ``start()`` starts it, ``stop()`` joins it."""

    def __init__(
        self,
        device: str = "cpu",
        max_batch_size: int = 32,
        max_queue: int = 10_000,
        metrics: HubMetrics | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an integer >= 1, got {max_batch_size}")
        self.device = device
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self._metrics = metrics
        self._models: dict[str, LoadedModel] = {}
        self._models_lock = threading.Lock()
        self._queue: queue.SimpleQueue[_Item | object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._accepting = False

    # --- models ----------------------------------------------------------------------------
    def load(self, source: Path | bytes) -> ModelSpec:
        """Load a cloud checkpoint and make it the active model for its task (raises InvalidInput)."""
        model = load_model(source, self.device)
        with self._models_lock:
            previous = self._models.get(model.spec.task)
            self._models[model.spec.task] = model
            count = len(self._models)
        if self._metrics is not None:
            self._metrics.models_loaded.set(count)
        old = f" (was {previous.spec.name}:{previous.spec.version})" if previous else ""
        log.info(
            "cloud model %s:%s active for task %r on %s%s",
            model.spec.name,
            model.spec.version,
            model.spec.task,
            self.device,
            old,
        )
        return model.spec

    def specs(self) -> dict[str, ModelSpec]:
        with self._models_lock:
            return {task: m.spec for task, m in self._models.items()}

    def has_models(self) -> bool:
        with self._models_lock:
            return bool(self._models)

    def _model(self, task: str) -> LoadedModel:
        with self._models_lock:
            model = self._models.get(task)
            loaded = sorted(self._models)
        if model is None:
            have = ", ".join(repr(t) for t in loaded) or "none"
            raise UnknownTask(
                f"no cloud model is loaded for task {task!r} (loaded: {have}); push a checkpoint for it"
            )
        return model

    # --- requests --------------------------------------------------------------------------
    def submit(self, task: str, tensor: np.ndarray) -> Future[Prediction]:
        """Queue N×C×H×W float32 samples for ``task``; raise UnknownTask/BadTensor/Unavailable at once."""
        if not self._accepting:
            raise Unavailable("inference is not running (the hub is starting or stopping); retry shortly")
        batch = self._model(task).check_input(tensor)
        if self._queue.qsize() >= self.max_queue:
            raise Unavailable(
                f"inference queue is full ({self.max_queue} requests); retry later", kind="overloaded"
            )
        future: Future[Prediction] = Future()
        self._queue.put(_Item(task, batch, future))
        return future

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name="hub-inference", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish what is queued, then stop the worker; later submits raise Unavailable."""
        self._accepting = False
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout)
            self._thread = None
        while True:  # anything left (worker stuck or already gone) is failed, never left hanging
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Item) and item.future.set_running_or_notify_cancel():
                item.future.set_exception(Unavailable("the hub stopped before running this request"))

    # --- worker ----------------------------------------------------------------------------
    def _run(self) -> None:
        carry: _Item | None = None
        while True:
            first = carry if carry is not None else self._queue.get()
            carry = None
            if first is _STOP:
                return
            assert isinstance(first, _Item)
            batch, n, stop = [first], first.n, False
            while n < self.max_batch_size:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop = True
                    break
                assert isinstance(nxt, _Item)
                if n + nxt.n > self.max_batch_size:
                    carry = nxt  # starts the next batch instead of overfilling this one
                    break
                batch.append(nxt)
                n += nxt.n
            self._execute(batch)
            if stop:
                self._queue.put(_STOP)

    def _execute(self, items: list[_Item]) -> None:
        groups: dict[str, list[_Item]] = {}
        for item in items:
            if item.future.set_running_or_notify_cancel():
                groups.setdefault(item.task, []).append(item)
        for task, group in groups.items():
            try:
                self._run_group(task, group)
            except Exception as exc:  # delivered to every waiter of the group; the worker lives on
                log.exception("inference for task %r failed on a batch of %d requests", task, len(group))
                err = (
                    exc
                    if isinstance(exc, HubServiceError)
                    else HubServiceError(
                        f"inference failed: {type(exc).__name__}: {exc}", kind="inference_failed"
                    )
                )
                for item in group:
                    if not item.future.done():
                        item.future.set_exception(err)

    def _run_group(self, task: str, group: list[_Item]) -> None:
        model = self._model(task)
        runnable: list[_Item] = []
        for item in group:
            try:  # the model may have been swapped for one with another input since submit()
                model.check_input(item.tensor)
                runnable.append(item)
            except HubServiceError as exc:
                item.future.set_exception(exc)
        if not runnable:
            return
        x = runnable[0].tensor if len(runnable) == 1 else np.concatenate([i.tensor for i in runnable])
        t0 = time.perf_counter()
        probs = model.predict(x)
        elapsed = time.perf_counter() - t0
        if probs.shape[0] != x.shape[0]:
            raise RuntimeError(f"model returned {probs.shape[0]} outputs for {x.shape[0]} inputs")
        if self._metrics is not None:
            self._metrics.inference_latency.labels(task).observe(elapsed)
            self._metrics.batch_size.labels(task).observe(x.shape[0])
        spec, pos = model.spec, 0
        for item in runnable:
            p = probs[pos : pos + item.n]
            pos += item.n
            ids = [int(i) for i in p.argmax(axis=1)]
            item.future.set_result(
                Prediction(
                    task=task,
                    model_name=spec.name,
                    model_version=spec.version,
                    label_ids=ids,
                    labels=[spec.labels[i] for i in ids],
                    confidences=[float(p[j, i]) for j, i in enumerate(ids)],
                    probabilities=p,
                    inference_ms=elapsed * 1000.0,
                    batch_size=int(x.shape[0]),
                )
            )
