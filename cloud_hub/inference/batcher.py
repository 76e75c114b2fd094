"""Dynamic batching: requests for one key (a task) wait briefly so that one forward pass serves many.

A worker thread takes the oldest waiting request, then waits until either ``max_batch_size``
samples of the same key are queued or ``max_queue_delay_ms`` has passed since that request
arrived, and hands the batch to ``execute``. Under load the queue refills while a batch runs, so
the next batch forms without waiting; with one lone request the delay is the most it ever waits.
The delay applies only under load (the previous batch held more than one request): a request that
arrives after an idle spell runs at once, so light traffic pays no batching latency.

Rules every request can rely on:

- a request is never split: its N samples run in one batch (a request larger than
  ``max_batch_size`` runs alone);
- a request whose deadline has passed when its batch forms is answered with ``DeadlineExceeded``
  and never computed;
- the queue is bounded (``max_queue`` requests): a submit beyond it raises ``QueueFull`` at once,
  which is the backpressure callers pass on (503 over REST, an error answer over MQTT);
- ``execute`` returns one result (or one exception) per request; if it raises, or returns another
  count, every waiter of that batch gets the error and the worker carries on;
- ``stop()`` answers what is queued, then refuses; nothing is left waiting forever.

Callers wait on a ``concurrent.futures.Future`` (``submit``; the MQTT gateway adds a done-callback)
or, from an event loop, on an asyncio future (``submit_async``; the REST route), which the worker
answers with one thread-safe call per loop and batch instead of one loop wake-up per request.
Metrics (when given): queue delay per request, batch size and batch time per batch, queue depth
(read at scrape time), and every error answered or raised, by kind.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np

from cloud_hub.errors import HubServiceError, Unavailable
from cloud_hub.metrics import HubMetrics

__all__ = ["BatchFailed", "DeadlineExceeded", "DynamicBatcher", "QueueFull"]

log = logging.getLogger(__name__)

R = TypeVar("R")


class QueueFull(Unavailable):
    """The inference queue holds ``max_queue`` requests; the caller should retry later."""

    kind = "queue_full"


class DeadlineExceeded(Unavailable):
    """The request's deadline passed before its batch could start; it was not computed."""

    kind = "deadline_exceeded"


class BatchFailed(HubServiceError):
    """The model failed on a batch (or broke the one-output-per-input rule); every waiter gets it."""

    kind = "inference_failed"


@dataclass(slots=True)
class _Request(Generic[R]):
    """One waiting request: a thread-safe Future, an asyncio future on ``loop`` (``submit_async``), or a
    callback called with the result or the error (``submit_callback``)."""

    key: str
    tensor: np.ndarray
    n: int
    enqueued: float
    deadline: float  # time.monotonic(); math.inf when none
    future: Future[R] | None = None
    afuture: asyncio.Future[R] | None = None
    loop: asyncio.AbstractEventLoop | None = None
    callback: Callable[[Any], None] | None = None

    def cancelled(self) -> bool:
        f = self.future if self.future is not None else self.afuture
        return f is not None and f.cancelled()

    def claim(self) -> bool:
        """Mark it running; False when its caller cancelled it (then nobody is waiting)."""
        if self.future is not None:
            return self.future.set_running_or_notify_cancel()
        return not self.cancelled()


def _settle_on_loop(items: list[tuple[asyncio.Future[Any], Any]]) -> None:
    """Runs on the caller's event loop: one call per batch answers all of that loop's waiters."""
    for fut, outcome in items:
        if fut.done():
            continue
        if isinstance(outcome, BaseException):
            fut.set_exception(outcome)
        else:
            fut.set_result(outcome)


class DynamicBatcher(Generic[R]):
    """Queue + one worker thread; ``start()`` starts it, ``stop()`` drains and joins it."""

    def __init__(
        self,
        execute: Callable[[str, list[np.ndarray]], Sequence[R | BaseException]],  # one result per tensor
        *,
        max_batch_size: int = 32,
        max_queue_delay_ms: float = 2.0,
        max_queue: int = 10_000,
        deadline_ms: float | None = None,
        metrics: HubMetrics | None = None,
        name: str = "hub-batcher",
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an integer >= 1, got {max_batch_size}")
        if max_queue_delay_ms < 0:
            raise ValueError(f"max_queue_delay_ms must be >= 0, got {max_queue_delay_ms}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        if deadline_ms is not None and deadline_ms <= 0:
            raise ValueError(f"deadline_ms must be > 0 (or None for no deadline), got {deadline_ms}")
        self._execute = execute
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_ms / 1000.0
        self._last_batch_requests = 0
        self.max_queue = max_queue
        self.deadline_ms = deadline_ms
        self._metrics = metrics
        self._name = name
        self._cond = threading.Condition()
        self._pending: dict[str, deque[_Request[R]]] = {}
        self._samples: dict[str, int] = {}
        self._count = 0
        self._busy = False  # a batch is running (worker or inline); the worker starts the next after it
        self._running = False
        self._thread: threading.Thread | None = None
        if metrics is not None:  # read at scrape time: nothing to update per request
            metrics.queue_depth.set_function(lambda: self._count)

    # --- requests --------------------------------------------------------------------------
    def submit(self, key: str, tensor: np.ndarray, deadline_ms: float | None = None) -> Future[R]:
        """Queue ``tensor`` (N samples along axis 0) for ``key``; raise Unavailable/QueueFull at once.

        ``deadline_ms`` (default: the batcher's) is counted from now; None and no default mean none.
        """
        req = self._request(key, tensor, deadline_ms)
        req.future = Future()
        self._enqueue(req)
        return req.future

    def submit_callback(
        self, key: str, tensor: np.ndarray, callback: Callable[[R | BaseException], None],
        deadline_ms: float | None = None, *, inline_when_idle: bool = False,
    ) -> None:
        """As ``submit``, but ``callback(result_or_error)`` is called on the worker thread when it is
        settled (an error is passed, not raised), with no Future: the cheapest way for a caller that
        only reacts to the outcome (the MQTT gateway). The callback must be quick and must not raise.

        With ``inline_when_idle``, a request that finds nothing queued and no batch running is run at
        once on the calling thread (a batch of one, as the worker would run it), sparing the two
        thread hand-offs that dominate a lone request's latency; under load requests queue and batch.
        """
        req = self._request(key, tensor, deadline_ms)
        req.callback = callback
        if inline_when_idle and self._run_inline(req):
            return
        self._enqueue(req)

    def _run_inline(self, req: _Request[R]) -> bool:
        with self._cond:
            if not self._running or self._count or self._busy:
                return False
            self._busy = True
        try:
            self._run_batch(req.key, [req])
        finally:
            with self._cond:
                self._busy = False
                self._last_batch_requests = 1
                if self._count:
                    self._cond.notify()
        return True

    def submit_async(self, key: str, tensor: np.ndarray, deadline_ms: float | None = None) -> asyncio.Future[R]:
        """As ``submit``, for a caller on a running event loop: the answer is an asyncio future of that loop.

        The worker answers all of one loop's requests in a batch with one thread-safe call, instead of
        one loop wake-up per request as ``asyncio.wrap_future(submit(...))`` costs.
        """
        loop = asyncio.get_running_loop()
        req = self._request(key, tensor, deadline_ms)
        req.afuture, req.loop = loop.create_future(), loop
        self._enqueue(req)
        return req.afuture

    def _request(self, key: str, tensor: np.ndarray, deadline_ms: float | None) -> _Request[R]:
        budget = self.deadline_ms if deadline_ms is None else deadline_ms
        if budget is not None and budget <= 0:
            raise ValueError(f"deadline_ms must be > 0, got {budget}")
        now = time.monotonic()
        deadline = now + budget / 1000.0 if budget is not None else math.inf
        return _Request(key, tensor, int(tensor.shape[0]), now, deadline)

    def _enqueue(self, req: _Request[R]) -> None:
        key = req.key
        with self._cond:
            if not self._running:
                raise self._refused(Unavailable("inference is not running (the hub is starting or stopping); "
                                                "retry shortly"))
            if self._count >= self.max_queue:
                raise self._refused(QueueFull(f"inference queue is full ({self.max_queue} requests waiting); "
                                              "retry later"))
            q = self._pending.get(key)
            if q is None:
                q = self._pending[key] = deque()
                self._samples[key] = 0
            q.append(req)
            self._samples[key] += req.n
            self._count += 1
            # Wake the worker only when it matters: it waits for a first request, or for this key's
            # batch to fill (it serves the oldest key first, so other keys' requests can wait).
            if self._count == 1 or self._samples[key] >= self.max_batch_size:
                self._cond.notify()

    @property
    def depth(self) -> int:
        """Requests waiting (not yet taken into a batch)."""
        return self._count

    @property
    def running(self) -> bool:
        return self._running

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        with self._cond:
            if self._running:
                return
            self._running = True
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Run what is queued without waiting for more, then stop; later submits raise Unavailable."""
        with self._cond:
            self._running = False
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._cond:  # anything left (worker stuck or gone) is failed, never left hanging
            left = [r for q in self._pending.values() for r in q]
            self._pending.clear()
            self._samples.clear()
            self._count = 0
        stopped = Unavailable("the hub stopped before running this request", kind="stopped")
        self._settle([(req, stopped) for req in left])

    # --- worker ----------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            taken = self._take()
            if taken is None:
                return
            key, batch, expired = taken
            now = time.monotonic()
            try:
                self._settle([(req, DeadlineExceeded(
                    f"request waited {1000.0 * (now - req.enqueued):.0f} ms, past its deadline; it was not computed"))
                    for req in expired])
                if batch:
                    self._run_batch(key, batch)
            finally:
                with self._cond:
                    self._busy = False

    def _take(self) -> tuple[str, list[_Request[R]], list[_Request[R]]] | None:
        """Block until a batch is due; return (key, batch, expired), or None once stopped and empty."""
        with self._cond:
            while not self._pending or self._busy:
                if not self._running and not self._pending:
                    return None
                self._cond.wait()
            key = min(self._pending, key=lambda k: self._pending[k][0].enqueued)
            q = self._pending[key]
            # Wait for a batch to fill only under load (the last batch held more than one request): a lone
            # request after an idle spell runs at once instead of paying the whole delay.
            delay = self.max_queue_delay_s if self._last_batch_requests > 1 else 0.0
            flush_at = q[0].enqueued + delay
            while self._running and self._samples[key] < self.max_batch_size:
                wait = flush_at - time.monotonic()
                if wait <= 0:
                    break
                self._cond.wait(wait)
            now = time.monotonic()
            batch: list[_Request[R]] = []
            expired: list[_Request[R]] = []
            n = 0
            while q:
                req = q[0]
                if req.deadline <= now or req.cancelled():
                    q.popleft()  # a cancelled request has nobody waiting: dropped without an answer
                    if not req.cancelled():
                        expired.append(req)
                    self._samples[key] -= req.n
                    self._count -= 1
                    continue
                if batch and n + req.n > self.max_batch_size:
                    break
                batch.append(q.popleft())
                self._samples[key] -= req.n
                self._count -= 1
                n += req.n
                if n >= self.max_batch_size:
                    break
            if not q:
                del self._pending[key]
                del self._samples[key]
            if batch:
                self._last_batch_requests = len(batch)
            self._busy = True
        return key, batch, expired

    def _run_batch(self, key: str, batch: list[_Request[R]]) -> None:
        started = time.monotonic()
        live = [r for r in batch if r.claim()]
        if not live:
            return
        m = self._metrics
        if m is not None:
            delay = m.queue_delay.labels(key)
            for r in live:
                delay.observe(started - r.enqueued)
        try:
            results = self._execute(key, [r.tensor for r in live])
            if len(results) != len(live):
                raise BatchFailed(f"inference returned {len(results)} results for a batch of {len(live)} "
                                  "requests; none of them is answered with a guess")
        except Exception as exc:  # delivered to every waiter of the batch; the worker lives on
            log.exception("inference for %r failed on a batch of %d requests", key, len(live))
            err = exc if isinstance(exc, HubServiceError) else BatchFailed(
                f"inference failed: {type(exc).__name__}: {exc}")
            self._settle([(r, err) for r in live])
            return
        if m is not None:
            m.inference_latency.labels(key).observe(time.monotonic() - started)
            m.batch_size.labels(key).observe(sum(r.n for r in live))
        self._settle(list(zip(live, results, strict=True)))

    # --- helpers ---------------------------------------------------------------------------
    def _settle(self, outcomes: Sequence[tuple[_Request[R], R | BaseException]]) -> None:
        """Answer each request with its result or error; asyncio waiters get one call per loop."""
        on_loops: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any]]] = {}
        for req, outcome in outcomes:
            if isinstance(outcome, BaseException):
                self._count_error(outcome)
            if req.callback is not None:
                try:
                    req.callback(outcome)
                except Exception:  # a caller's bug must not stop the answers to the rest of the batch
                    log.exception("result callback failed")
            elif req.future is not None:
                try:
                    if isinstance(outcome, BaseException):
                        req.future.set_exception(outcome)
                    else:
                        req.future.set_result(outcome)
                except InvalidStateError:  # cancelled by its caller meanwhile: nobody is waiting
                    pass
            elif req.afuture is not None and req.loop is not None:
                on_loops.setdefault(req.loop, []).append((req.afuture, outcome))
        for loop, items in on_loops.items():
            try:
                loop.call_soon_threadsafe(_settle_on_loop, items)
            except RuntimeError:  # the caller's loop is closed: nobody is left to answer
                log.debug("dropped %d answers for a closed event loop", len(items))

    def _refused(self, exc: HubServiceError) -> HubServiceError:
        self._count_error(exc)
        return exc

    def _count_error(self, exc: BaseException) -> None:
        if self._metrics is not None:
            kind = exc.kind if isinstance(exc, HubServiceError) else "inference_failed"
            self._metrics.inference_errors.labels(kind).inc()
