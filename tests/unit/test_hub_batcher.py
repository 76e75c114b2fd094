"""The dynamic batcher and the inference service on top of it: deadlines, backpressure, errors to every
waiter, one output per input, batches forming under concurrency, the queue delay bound, warm-up before
readiness, the inference metrics, and the P4 benchmark running without pydantic/fastapi/sqlalchemy."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cloud_hub.errors import Unavailable
from cloud_hub.inference import (
    BatchFailed,
    DeadlineExceeded,
    DynamicBatcher,
    InferenceService,
    LoadedModel,
    ModelSpec,
    QueueFull,
    load_model,
    size_classes,
)
from cloud_hub.metrics import HubMetrics
from tests.hub_fixtures import HubModels

pytest_plugins = ["tests.hub_fixtures"]

REPO = Path(__file__).resolve().parents[2]
SPEC = ModelSpec("toy", "1", "t", ("a", "b"), (1, 4, 4))


def _x(n: int = 1, value: float = 0.0) -> np.ndarray:
    return np.full((n, 1, 4, 4), value, np.float32)


class Gate:
    """An execute function that records each batch and can hold the worker inside a batch."""

    def __init__(self, fail: Exception | None = None, results: Callable[[int], int] | None = None) -> None:
        self.calls: list[list[float]] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.release.set()
        self.fail = fail
        self.results = results

    def __call__(self, key: str, tensors: list[np.ndarray]) -> Sequence[float | BaseException]:
        values = [float(t[0, 0, 0, 0]) for t in tensors]
        self.calls.append(values)
        self.entered.set()
        assert self.release.wait(10), "test never released the batch"
        if self.fail is not None and values != [1.0]:  # the request that holds the worker (value 1) succeeds
            raise self.fail
        count = self.results(len(tensors)) if self.results else len(tensors)
        return [float(t[0, 0, 0, 0]) * 10 for t in tensors][:count] + [0.0] * max(0, count - len(tensors))

    def hold(self) -> None:
        self.release.clear()
        self.entered.clear()


@pytest.fixture
def make_batcher() -> Iterator[Callable[..., DynamicBatcher[float]]]:
    made: list[DynamicBatcher[float]] = []

    def make(execute: Gate, **kw: object) -> DynamicBatcher[float]:
        b: DynamicBatcher[float] = DynamicBatcher(execute, **kw)  # type: ignore[arg-type]
        b.start()
        made.append(b)
        return b

    yield make
    for b in made:
        b.stop(5)


def _block_worker(gate: Gate, batcher: DynamicBatcher[float]) -> Future[float]:
    """Submit one request and wait until the worker is inside its batch (held by ``gate``)."""
    gate.hold()
    first = batcher.submit("t", _x(value=1))
    assert gate.entered.wait(5)
    return first


def test_expired_requests_get_an_error_and_are_never_computed(
    make_batcher: Callable[..., DynamicBatcher[float]],
) -> None:
    gate = Gate()
    metrics = HubMetrics()
    b = make_batcher(gate, max_batch_size=8, max_queue_delay_ms=0, metrics=metrics)
    first = _block_worker(gate, b)
    late = b.submit("t", _x(value=2), deadline_ms=30)
    fresh = b.submit("t", _x(value=3), deadline_ms=10_000)
    time.sleep(0.1)
    gate.release.set()
    assert first.result(5) == 10.0
    assert fresh.result(5) == 30.0
    with pytest.raises(DeadlineExceeded, match="past its deadline; it was not computed") as info:
        late.result(5)
    assert info.value.kind == "deadline_exceeded"
    assert all(2.0 not in call for call in gate.calls), f"an expired request was computed: {gate.calls}"
    assert metrics.inference_errors.labels("deadline_exceeded")._value.get() == 1
    with pytest.raises(ValueError, match="deadline_ms must be > 0"):
        b.submit("t", _x(), deadline_ms=0)


def test_callback_requests_get_their_result_or_their_error_and_one_bad_callback_harms_no_other(
    make_batcher: Callable[..., DynamicBatcher[float]],
) -> None:
    gate = Gate()
    b = make_batcher(gate, max_batch_size=8, max_queue_delay_ms=0)
    first = _block_worker(gate, b)
    got: dict[str, object] = {}
    done = threading.Event()

    def record(name: str) -> Callable[[object], None]:
        def cb(outcome: object) -> None:
            got[name] = outcome
            if len(got) == 3:
                done.set()
        return cb

    def broken(outcome: object) -> None:
        raise RuntimeError("caller bug")

    b.submit_callback("t", _x(value=4), broken)  # queued first in the batch: its failure is only logged
    b.submit_callback("t", _x(value=2), record("ok"))
    b.submit_callback("t", _x(value=5), record("late"), deadline_ms=30)
    b.submit_callback("t", _x(value=3), record("ok2"))
    time.sleep(0.1)
    gate.release.set()
    assert first.result(5) == 10.0
    assert done.wait(5), got
    assert got["ok"] == 20.0 and got["ok2"] == 30.0
    assert isinstance(got["late"], DeadlineExceeded)  # passed to the callback, not raised
    assert all(5.0 not in call for call in gate.calls)


def test_inline_when_idle_runs_on_the_caller_only_when_nothing_else_is_waiting_or_running(
    make_batcher: Callable[..., DynamicBatcher[float]],
) -> None:
    gate = Gate()
    b = make_batcher(gate, max_batch_size=8, max_queue_delay_ms=0)
    seen: list[tuple[object, str]] = []
    b.submit_callback("t", _x(value=2), lambda r: seen.append((r, threading.current_thread().name)),
                      inline_when_idle=True)
    assert seen == [(20.0, threading.current_thread().name)]  # answered before submit returned, here
    first = _block_worker(gate, b)  # a batch is running on the worker now
    done = threading.Event()
    b.submit_callback("t", _x(value=3), lambda r: (seen.append((r, threading.current_thread().name)), done.set()),
                      inline_when_idle=True)
    assert len(seen) == 1  # not run inline: it waits for the worker
    gate.release.set()
    assert first.result(5) == 10.0 and done.wait(5)
    assert seen[1][0] == 30.0 and seen[1][1] != threading.current_thread().name


def test_a_full_queue_refuses_at_once_and_recovers(make_batcher: Callable[..., DynamicBatcher[float]]) -> None:
    gate = Gate()
    metrics = HubMetrics()
    b = make_batcher(gate, max_batch_size=8, max_queue_delay_ms=0, max_queue=2, metrics=metrics)
    first = _block_worker(gate, b)
    queued = [b.submit("t", _x(value=v)) for v in (2, 3)]
    assert b.depth == 2
    assert "edgefed_hub_inference_queue_depth 2.0" in metrics.render()[0].decode()
    t0 = time.monotonic()
    with pytest.raises(QueueFull, match=r"inference queue is full \(2 requests waiting\)") as info:
        b.submit("t", _x(value=4))
    assert time.monotonic() - t0 < 0.5  # refused at once, not blocked
    assert info.value.kind == "queue_full" and isinstance(info.value, Unavailable)
    gate.release.set()
    assert [f.result(5) for f in (first, *queued)] == [10.0, 20.0, 30.0]
    assert b.submit("t", _x(value=5)).result(5) == 50.0  # room again
    assert metrics.inference_errors.labels("queue_full")._value.get() == 1


def test_a_model_error_reaches_every_waiter_and_the_worker_lives_on(
    make_batcher: Callable[..., DynamicBatcher[float]],
) -> None:
    gate = Gate()
    b = make_batcher(gate, max_batch_size=8, max_queue_delay_ms=0)
    first = _block_worker(gate, b)
    batch = [b.submit("t", _x(value=v)) for v in (2, 3, 4)]
    gate.fail = RuntimeError("CUDA error: device-side assert")
    gate.release.set()
    assert first.result(5) == 10.0
    for f in batch:
        with pytest.raises(BatchFailed, match="inference failed: RuntimeError: CUDA error") as info:
            f.result(5)
        assert info.value.kind == "inference_failed"
    assert gate.calls[-1] == [2.0, 3.0, 4.0]  # one batch, all three waiters failed
    gate.fail = None
    assert b.submit("t", _x(value=6)).result(5) == 60.0


@pytest.mark.parametrize("count", [2, 4])
def test_a_batch_with_another_number_of_results_fails_every_waiter(
    make_batcher: Callable[..., DynamicBatcher[float]], count: int
) -> None:
    gate = Gate(results=lambda n: count if n == 3 else n)
    b = make_batcher(gate, max_batch_size=8, max_queue_delay_ms=0)
    first = _block_worker(gate, b)
    batch = [b.submit("t", _x(value=v)) for v in (2, 3, 4)]
    gate.release.set()
    first.result(5)
    for f in batch:
        with pytest.raises(BatchFailed, match=f"returned {count} results for a batch of 3 requests"):
            f.result(5)


def test_lone_request_waits_at_most_the_queue_delay_and_a_full_batch_does_not_wait(
    make_batcher: Callable[..., DynamicBatcher[float]],
) -> None:
    gate = Gate()
    b = make_batcher(gate, max_batch_size=4, max_queue_delay_ms=150)
    t0 = time.monotonic()
    assert b.submit("t", _x(value=1)).result(5) == 10.0
    waited = time.monotonic() - t0
    assert waited < 0.1, f"a lone request after an idle spell waited {waited:.3f} s; it should run at once"
    # Under load (the last batch held several requests) a lone request waits for company, at most the delay.
    first = _block_worker(gate, b)
    pair = [b.submit("t", _x(value=v)) for v in (2, 3)]
    gate.release.set()
    assert first.result(5) == 10.0 and [f.result(5) for f in pair] == [20.0, 30.0]
    assert gate.calls[-1] == [2.0, 3.0]
    t0 = time.monotonic()
    assert b.submit("t", _x(value=4)).result(5) == 40.0
    waited = time.monotonic() - t0
    assert 0.14 <= waited < 1.0, f"lone request under load took {waited:.3f} s with a 150 ms queue delay"
    b2 = make_batcher(Gate(), max_batch_size=4, max_queue_delay_ms=3000)
    t0 = time.monotonic()
    futures = [b2.submit("t", _x(value=v)) for v in range(4)]
    assert [f.result(5) for f in futures] == [0.0, 10.0, 20.0, 30.0]
    assert time.monotonic() - t0 < 2.0, "a full batch waited for the queue delay"


def test_requests_are_never_split_and_keys_are_never_mixed(make_batcher: Callable[..., DynamicBatcher[float]]) -> None:
    seen: list[tuple[str, list[int]]] = []

    def execute(key: str, tensors: list[np.ndarray]) -> list[float]:
        seen.append((key, [int(t.shape[0]) for t in tensors]))
        return [float(t.shape[0]) for t in tensors]

    b: DynamicBatcher[float] = DynamicBatcher(execute, max_batch_size=4, max_queue_delay_ms=50)
    b.start()
    try:
        futures = [b.submit(k, _x(n)) for k, n in (("a", 3), ("b", 1), ("a", 3), ("a", 6), ("b", 2))]
        assert [f.result(5) for f in futures] == [3.0, 1.0, 3.0, 6.0, 2.0]
    finally:
        b.stop()
    for key, sizes in seen:
        assert sum(sizes) <= 4 or sizes == [6], f"batch {sizes} for {key} overfilled"
    assert sorted(n for _, sizes in seen for n in sizes) == [1, 2, 3, 3, 6]


def test_stop_answers_what_is_queued_then_refuses(make_batcher: Callable[..., DynamicBatcher[float]]) -> None:
    gate = Gate()
    b = make_batcher(gate, max_batch_size=1, max_queue_delay_ms=0)
    first = _block_worker(gate, b)
    queued = b.submit("t", _x(value=2))
    threading.Timer(0.1, gate.release.set).start()
    b.stop(5)
    assert first.result(1) == 10.0 and queued.result(1) == 20.0
    with pytest.raises(Unavailable, match="not running"):
        b.submit("t", _x())


def test_async_waiters_get_answers_errors_and_cancelled_ones_are_not_computed(
    make_batcher: Callable[..., DynamicBatcher[float]],
) -> None:
    gate = Gate()
    b = make_batcher(gate, max_batch_size=8, max_queue_delay_ms=20)

    async def scenario() -> None:
        assert await asyncio.gather(*(b.submit_async("t", _x(value=v)) for v in (2, 3, 4))) == [20.0, 30.0, 40.0]
        assert gate.calls[-1] == [2.0, 3.0, 4.0]  # one batch
        first = await asyncio.to_thread(_block_worker, gate, b)
        gone = b.submit_async("t", _x(value=5))
        late = b.submit_async("t", _x(value=6), deadline_ms=20)
        kept = b.submit_async("t", _x(value=7))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(gone, 0.05)  # the REST route's timeout cancels the waiter
        gate.release.set()
        with pytest.raises(DeadlineExceeded):
            await late
        assert await kept == 70.0
        assert first.result(5) == 10.0

    asyncio.run(scenario())
    assert all(5.0 not in call and 6.0 not in call for call in gate.calls), gate.calls


# --- the service with real torch models -------------------------------------------------------
class _CountingNet(nn.Module):
    """A tiny real network that counts forward passes and can be held inside one."""

    def __init__(self, extra_rows: int = 0) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 2)
        self.calls: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.extra_rows = extra_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(int(x.shape[0]))
        assert self.gate.wait(10)
        out = self.lin(x.flatten(1))
        return torch.cat([out, out[: self.extra_rows]]) if self.extra_rows else out


def test_a_model_becomes_ready_only_after_warm_up_on_every_size_class() -> None:
    net = _CountingNet()
    svc = InferenceService("cpu", max_batch_size=16, warmup_batches=2)
    net.gate.clear()
    t = threading.Thread(target=svc.activate, args=(LoadedModel(net, SPEC, "cpu"),))
    t.start()
    time.sleep(0.2)
    assert not svc.has_models(), "ready while the model was still warming up"
    net.gate.set()
    t.join(10)
    assert svc.has_models()
    assert size_classes(16) == (1, 2, 4, 8, 16)
    assert net.calls == [1, 1, 2, 2, 4, 4, 8, 8, 16, 16]
    svc.start()
    try:
        assert svc.submit("t", _x()).result(10).probabilities.shape == (1, 2)
    finally:
        svc.stop()


def test_a_model_breaking_one_output_per_input_fails_every_waiter() -> None:
    net = _CountingNet(extra_rows=1)
    svc = InferenceService("cpu", max_batch_size=8, warmup_batches=0, max_queue_delay_ms=200)
    svc.activate(LoadedModel(net, SPEC, "cpu"))
    svc.start()
    try:
        futures = [svc.submit("t", _x()) for _ in range(3)]
        for f in futures:
            with pytest.raises(BatchFailed, match=r"returned \[4, 2\] outputs for 3 input samples"):
                f.result(10)
    finally:
        svc.stop()


@pytest.fixture
def service(hub_models: HubModels) -> Iterator[tuple[InferenceService, HubMetrics]]:
    metrics = HubMetrics()
    svc = InferenceService("cpu", max_batch_size=8, metrics=metrics, max_queue_delay_ms=5, warmup_batches=1)
    svc.load(hub_models.checkpoint_path)
    svc.start()
    try:
        yield svc, metrics
    finally:
        svc.stop()


def test_batches_form_under_concurrency_with_correct_answers_and_metrics(
    service: tuple[InferenceService, HubMetrics], hub_models: HubModels
) -> None:
    svc, metrics = service
    reference = load_model(hub_models.checkpoint_path)
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((1, 1, 32, 32)).astype(np.float32) for _ in range(16)]
    results: dict[int, object] = {}

    def client(i: int) -> None:
        for j in range(4):
            k = (i * 4 + j) % len(xs)
            results[i * 4 + j] = (k, svc.submit("t", xs[k]).result(30))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert len(results) == 48
    sizes = []
    for k, pred in results.values():  # type: ignore[misc]
        np.testing.assert_allclose(pred.probabilities[0], reference.predict(xs[k])[0], atol=1e-5)
        assert len(pred.label_ids) == 1 and pred.batch_size <= 8
        sizes.append(pred.batch_size)
    assert max(sizes) > 1, f"12 concurrent clients never shared a batch: {sizes}"
    text = metrics.render()[0].decode()
    for name in ("edgefed_hub_batch_size_bucket", "edgefed_hub_queue_delay_seconds_bucket",
                 "edgefed_hub_inference_latency_seconds_bucket", "edgefed_hub_inference_queue_depth"):
        assert name in text, f"{name} missing from /metrics"
    assert metrics.queue_delay.labels("t")._sum.get() > 0
    with pytest.raises(Exception, match="no cloud model is loaded for task 'nope'"):
        svc.submit("nope", xs[0])
    assert 'edgefed_hub_inference_errors_total{kind="unknown_task"} 1.0' in metrics.render()[0].decode()


# --- P4 benchmark ---------------------------------------------------------------------------------
def test_p4_bench_runs_with_only_torch_numpy_and_prometheus(tmp_path: Path, hub_models: HubModels) -> None:
    out = tmp_path / "p4.json"
    blocked = ["pydantic", "pydantic_settings", "fastapi", "sqlalchemy", "paho", "onnxruntime", "uvicorn", "httpx"]
    code = (
        "import sys, runpy\n"
        f"for name in {blocked!r}: sys.modules[name] = None\n"
        f"sys.argv = ['hub_batching', '--out', {str(out)!r}, '--device', 'cpu', '--concurrency', '4', "
        "'--duration', '0.4', '--warmup', '0.1', '--max-batch-size', '4', '--warmup-batches', '1', "
        f"'--checkpoint', {str(hub_models.checkpoint_path)!r}]\n"
        "runpy.run_module('shared.bench.hub_batching', run_name='__main__')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads(out.read_text())
    m = d["measurements"]
    assert m["device"] == "cpu" and m["device_name"] == d["machine"]["cpu_model"]
    assert m["model"]["weights"] == "trained" and m["model"]["model"] == "t-cloud:1"
    assert len(m["model"]["sha256"]) == 64 and m["model"]["input_chw"] == [1, 32, 32]
    for path in ("gateway_like", "rest_like"):
        batched, single = m["batched"][path], m["one_at_a_time"][path]
        assert batched["completed_in_window"] > 0 and single["completed_in_window"] > 0
        assert batched["errors"] == {} and single["errors"] == {}
        assert single["batch_size"]["max"] == 1 and batched["batch_size"]["max"] <= 4
        assert m[path]["throughput_ratio"] > 0 and isinstance(m[path]["p99_le_50ms"], bool)
    assert {t["what"].split(",")[0] for t in d["targets"]} == {
        "throughput batched / one at a time", "p99 latency with batching"}


def test_p4_measures_the_factory_default_elpv_cloud_model() -> None:
    from cloud_hub.factory.train import TrainConfig
    from shared.bench.hub_batching import ELPV_CLOUD, _build_model
    from shared.data.tasks import TASKS

    cfg, task = TrainConfig(), TASKS["elpv"]
    assert ELPV_CLOUD["arch"] == cfg.arch("cloud")
    assert ELPV_CLOUD["arch_kwargs"] == {"in_channels": task.channels, "num_classes": task.num_classes,
                                         **cfg.arch_kwargs("cloud", symmetric=True)}
    assert tuple(ELPV_CLOUD["input_chw"]) == (task.channels, *task.resolution)
    assert tuple(ELPV_CLOUD["labels"]) == task.labels
    model, weights = _build_model("cpu", None, seed=0)
    assert weights["weights"] == "random" and model.spec.input_chw == (1, 64, 64)
    assert type(model._net).__name__ == "CloudCNN" and model._net.tta == "flips"


def test_bench_hub_command_writes_the_p4_result(tmp_path: Path, hub_models: HubModels) -> None:
    from typer.testing import CliRunner

    from shared.bench.cli import bench_app

    runner = CliRunner()
    r = runner.invoke(bench_app, ["hub", "--sections", "p4", "--device", "cpu", "--concurrency", "2", "--duration",
                                  "0.2", "--warmup", "0", "--max-batch-size", "2", "--checkpoint",
                                  str(hub_models.checkpoint_path), "--out-dir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    d = json.loads((tmp_path / "hub-p4.json").read_text())
    assert d["benchmark"] == "hub/p4" and d["settings"]["max_batch_size"] == 2
    assert d["measurements"]["model"]["weights"] == "trained"
    bad = runner.invoke(bench_app, ["hub", "--sections", "p4,p6"])
    assert bad.exit_code == 2 and "unknown section(s) p6" in bad.output
