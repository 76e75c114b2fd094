"""The Flower ServerApp: one federation run from the hub's current checkpoint to ``global.pt``.

The run config holds one key, ``spec``: a ``FedRunSpec`` as JSON (``federation.runner`` puts it
there). The app loads ``spec.initial_checkpoint``, evaluates it on the reference set
(``federation.reference``), then runs ``spec.rounds`` rounds of the configured Flower strategy
(``federation.strategies``) through the strategy's own ``configure_*``/``aggregate_*`` methods,
timing each round and keeping every region's reply metrics:

- a round needs ``max(min_available, min_fit)`` connected SuperNodes within ``round_timeout_s``,
  and at least ``min_fit`` successful training replies within ``round_timeout_s``; otherwise the
  run fails with the reason in words;
- with ``secagg`` set, the training half of each round runs through Flower's ``SecAggPlusWorkflow``
  (``federation.secure_agg_server``) instead of ``configure_train``/``aggregate_train``: the server
  sees only the masked updates' sum; the round records the protocol's facts under ``secagg``;
- after training, the SuperNodes evaluate the new global model on their own cases (aggregated,
  weighted by their case counts) and the ServerApp evaluates it on the reference set.

``result.json`` (``FedResult`` as JSON) is rewritten after every round (status ``running``) and at
the end (``finished``/``failed`` with ``reason``); ``global.pt`` is written when the run finishes.
"""

from __future__ import annotations

import json
import logging
import os
import time
import traceback
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message
from flwr.serverapp import Grid, ServerApp

from federation.messaging import send_and_receive
from federation.records import (
    BUFFERS_KEY,
    average_buffers,
    buffers_from_config,
    buffers_to_config,
    from_record,
    to_record,
)
from federation.spec import FedResult, FedRunSpec

__all__ = ["app", "RunFailed", "write_result"]

log = logging.getLogger(__name__)

app = ServerApp()


class RunFailed(RuntimeError):
    """A run cannot go on (too few SuperNodes, too few replies, unusable data); the message says why."""


def write_result(output_dir: Path, result: FedResult) -> Path:
    """Write ``result.json`` atomically (readers never see half a file)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    d = asdict(result)
    d["global_checkpoint"] = None if result.global_checkpoint is None else str(result.global_checkpoint)
    tmp = output_dir / f".result.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(d, indent=2, default=_json_default))
    os.replace(tmp, output_dir / "result.json")
    return output_dir / "result.json"


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def _clean(metrics: Any) -> dict[str, Any]:
    """A MetricRecord (or None) as a plain dict of JSON-safe numbers (NaN becomes None)."""
    out: dict[str, Any] = {}
    for k, v in dict(metrics or {}).items():
        if isinstance(v, float) and v != v:
            out[k] = None
        else:
            out[k] = v
    return out


def _wait_for_nodes(grid: Grid, need: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        n = len(list(grid.get_node_ids()))
        if n >= need:
            return n
        if time.monotonic() >= deadline:
            raise RunFailed(f"only {n} SuperNode(s) connected within {timeout:.0f} s; the run needs {need}")
        time.sleep(0.2)


def _reply_region(msg: Message) -> str:
    info = msg.content.config_records.get("info")
    return str(info["region"]) if info is not None and "region" in info else f"node-{msg.metadata.src_node_id}"


def _reply_metrics(msg: Message) -> dict[str, Any]:
    return _clean(next(iter(msg.content.metric_records.values()), None))


@dataclass
class _Trained:
    """The training half of a round: new global weights and who contributed what."""

    arrays: dict[str, Any]
    sampled: int
    per_region: dict[str, dict[str, Any]]
    failures: list[str]
    train_metrics: dict[str, Any]
    train_wall: float
    aggregate_s: float
    secagg: dict[str, Any] | None = None


class _Run:
    """State of one run: spec, model, reference data, strategy, and the result being built."""

    def __init__(self, spec: FedRunSpec, run_id: str) -> None:
        import torch

        from federation.reference import load_reference
        from federation.strategies import build_strategy
        from federation.training import LocalData, state_to_arrays
        from shared.models import load_checkpoint

        torch.set_num_threads(int(os.environ.get("EDGEFED_FED_SERVER_THREADS", "1")))
        torch.manual_seed(spec.seed)
        self.spec = spec
        self.run_id = run_id
        self.started = time.monotonic()
        self.result = FedResult(
            status="running", global_checkpoint=None, rounds=[], regions=[], initial_metrics={}, final_metrics={},
            run_id=run_id,
        )
        self.strategy, self.result.privacy = build_strategy(spec, spec.fraction_evaluate)
        ckpt = load_checkpoint(Path(spec.initial_checkpoint))
        self.meta = ckpt.meta
        self.model = ckpt.model
        shape = self.meta.input.shape
        self.input_chw = (int(shape[1]), int(shape[2]), int(shape[3]))
        self.num_classes = len(self.meta.labels)
        x, y = load_reference(spec, self.input_chw, self.num_classes)
        if len(y) == 0:
            raise RunFailed("the reference set is empty")
        self.reference = LocalData.from_labels(x, y, self.num_classes)
        self.arrays = state_to_arrays(self.model)
        self.train_config = ConfigRecord(
            {
                "task": spec.task,
                "arch": self.meta.arch,
                "arch-kwargs": json.dumps(self.meta.arch_kwargs),
                "input-chw": json.dumps(list(self.input_chw)),
                "num-classes": self.num_classes,
                "lr": float(spec.lr),
                "local-epochs": int(spec.local_epochs),
                "batch-size": int(spec.batch_size),
                "soft-weight": float(spec.soft_weight),
                "seed": int(spec.seed),
            }
        )
        # BatchNorm running statistics are no learned parameters: a server optimizer (FedAdam, FedYogi,
        # FedAdagrad, FedAvgM) stepping on them by sign drives variances negative and the model to a
        # constant. They travel beside the strategy's record and are averaged by case count (FedAvg's
        # rule). With DP or SecAgg+ they stay in the record, so that they get the same protection.
        private = spec.differential_privacy is not None or spec.secagg is not None
        buffers = {n for n, _ in self.model.named_buffers()} & set(self.arrays)
        self.buffer_names: set[str] = set() if private else buffers
        self.secagg: Any = None
        if spec.secagg is not None:
            from federation.secure_agg_server import SecAggTrainer

            self.secagg = SecAggTrainer(spec, self.arrays, dict(self.train_config))

    def evaluate_global(self, arrays: dict[str, Any]) -> dict[str, Any]:
        from federation.training import evaluate, load_arrays

        m = evaluate(load_arrays(self.model, arrays), self.reference)
        return {"val_accuracy": m["accuracy"], "val_loss": m["loss"], "num_examples": int(m["num-examples"])}

    def save(self, status: str, reason: str = "") -> None:
        self.result.status = status  # type: ignore[assignment]
        self.result.reason = reason
        self.result.wall_s = round(time.monotonic() - self.started, 3)
        write_result(Path(self.spec.output_dir), self.result)

    def _min_fit_failed(self, rnd: int, ok: int, sampled: int, failures: list[str]) -> RunFailed:
        return RunFailed(
            f"round {rnd}: {ok} of {sampled} SuperNodes trained successfully, min_fit is {self.spec.min_fit}"
            + (f" ({'; '.join(failures)})" if failures else "")
        )

    def _train(self, grid: Grid, rnd: int, cfg: ConfigRecord) -> _Trained:
        """Training through the message-API strategy's own configure_train/aggregate_train."""
        spec = self.spec
        t0 = time.perf_counter()
        params = {k: v for k, v in self.arrays.items() if k not in self.buffer_names}
        messages = list(self.strategy.configure_train(rnd, to_record(params), cfg, grid))
        if self.buffer_names:
            buffers = buffers_to_config({k: self.arrays[k] for k in self.buffer_names})
            for m in messages:
                m.content.config_records[BUFFERS_KEY] = buffers
        replies = send_and_receive(grid, messages, timeout=spec.round_timeout_s)
        train_wall = time.perf_counter() - t0
        ok = [m for m in replies if not m.has_error()]
        failures = [f"node {m.metadata.src_node_id}: {m.error.reason}" for m in replies if m.has_error()]
        missing = len(messages) - len(replies)
        if missing > 0:
            failures.append(f"{missing} SuperNode(s) sent no reply within {spec.round_timeout_s:.0f} s")
        if len(ok) < spec.min_fit:
            raise self._min_fit_failed(rnd, len(ok), len(messages), failures)
        per_region: dict[str, dict[str, Any]] = {_reply_region(m): {"train": _reply_metrics(m)} for m in ok}
        agg_arrays, agg_metrics = self.strategy.aggregate_train(rnd, ok)
        if agg_arrays is None:
            raise RunFailed(f"round {rnd}: the strategy could not aggregate the {len(ok)} replies")
        new = {**self.arrays, **from_record(agg_arrays)}
        if self.buffer_names:
            parts = [(buffers_from_config(m.content.config_records[BUFFERS_KEY]),
                      float(m.content["metrics"].get("num-examples", 0.0)))
                     for m in ok if BUFFERS_KEY in m.content.config_records]
            if parts and sum(w for _, w in parts) > 0:
                new.update(average_buffers(parts))
        return _Trained(
            arrays=new, sampled=len(messages), per_region=per_region, failures=failures,
            train_metrics=_clean(agg_metrics), train_wall=train_wall,
            aggregate_s=time.perf_counter() - t0 - train_wall,
        )

    def _train_secagg(self, grid: Grid, rnd: int) -> _Trained:
        """Training through Flower's SecAggPlusWorkflow (federation.secure_agg_server)."""
        t0 = time.perf_counter()
        out = self.secagg.train_round(grid, rnd, self.arrays)
        wall = time.perf_counter() - t0
        if len(out.replies) < self.spec.min_fit:
            raise self._min_fit_failed(rnd, len(out.replies), out.sampled, out.failures)
        if out.arrays is None:
            stage = out.record.get("stopped_at") or "the end"
            why = f" ({'; '.join(out.failures)})" if out.failures else ""
            raise RunFailed(
                f"round {rnd}: SecAgg+ stopped at stage '{stage}' with {out.record.get('masked_updates', 0)} of "
                f"{out.sampled} masked updates: too few regions left for the reconstruction threshold "
                f"{out.record.get('reconstruction_threshold')}{why}"
            )
        return _Trained(
            arrays=out.arrays, sampled=out.sampled, per_region={r: {"train": m} for r, m in out.replies.items()},
            failures=out.failures, train_metrics=_clean(out.train_metrics), train_wall=wall,
            aggregate_s=out.unmask_s, secagg=out.record,
        )

    def run_round(self, grid: Grid, rnd: int) -> dict[str, Any]:
        spec = self.spec
        _wait_for_nodes(grid, max(spec.min_available, spec.min_fit), spec.round_timeout_s)
        cfg = ConfigRecord(dict(self.train_config))
        trained = self._train(grid, rnd, cfg) if self.secagg is None else self._train_secagg(grid, rnd)
        self.arrays = trained.arrays
        per_region, failures, train_wall = trained.per_region, trained.failures, trained.train_wall
        compute = [float(r["train"].get("compute-s") or 0.0) for r in per_region.values()]
        entry: dict[str, Any] = {
            "round": rnd,
            "clients": len(per_region),
            "sampled": trained.sampled,
            "regions": sorted(per_region),
            "failures": failures,
            "train_metrics": trained.train_metrics,
            "round_wall_s": round(train_wall, 4),
            "max_client_compute_s": round(max(compute), 4),
            "overhead_s": round(train_wall - max(compute), 4),
            "aggregate_s": round(trained.aggregate_s, 4),
        }
        if trained.secagg is not None:
            entry["secagg"] = trained.secagg
        if spec.fraction_evaluate > 0:
            t1 = time.perf_counter()
            emsgs = list(self.strategy.configure_evaluate(rnd, to_record(self.arrays), ConfigRecord(dict(cfg)), grid))
            ereplies = send_and_receive(grid, emsgs, timeout=spec.round_timeout_s)
            eok = [m for m in ereplies if not m.has_error()]
            for m in eok:
                per_region.setdefault(_reply_region(m), {})["evaluate"] = _reply_metrics(m)
            entry["client_eval"] = _clean(self.strategy.aggregate_evaluate(rnd, eok)) if eok else {}
            entry["client_eval_failures"] = [
                f"node {m.metadata.src_node_id}: {m.error.reason}" for m in ereplies if m.has_error()
            ]
            entry["evaluate_wall_s"] = round(time.perf_counter() - t1, 4)
        entry["per_region"] = per_region
        t2 = time.perf_counter()
        entry.update(self.evaluate_global(self.arrays))
        entry["server_eval_s"] = round(time.perf_counter() - t2, 4)
        for region in per_region:
            if region not in self.result.regions:
                self.result.regions.append(region)
        return entry

    def finish(self) -> None:
        from federation.training import load_arrays
        from shared.models import save_checkpoint

        load_arrays(self.model, self.arrays)
        self.result.final_metrics = self.evaluate_global(self.arrays)
        meta = self.meta.model_copy(deep=True)
        meta.parent_version = self.meta.version
        meta.version = f"{self.meta.version}+fed{self.run_id}"[:64]
        meta.metrics = {k: float(v) for k, v in self.result.final_metrics.items() if isinstance(v, (int, float))}
        meta.created_at = datetime.now(UTC).isoformat()
        path = Path(self.spec.output_dir) / "global.pt"
        save_checkpoint(path, meta, self.model)
        self.result.global_checkpoint = path
        self.result.regions.sort()


def run(grid: Grid, spec: FedRunSpec, run_id: str) -> FedResult:
    """Run the federation described by ``spec`` on ``grid``; always leaves a result.json behind."""
    state: _Run | None = None
    try:
        state = _Run(spec, run_id)
        state.result.initial_metrics = state.evaluate_global(state.arrays)
        state.save("running")
        for rnd in range(1, spec.rounds + 1):
            entry = state.run_round(grid, rnd)
            state.result.rounds.append(entry)
            log.info("round %d: val_accuracy %.4f, %d client(s)", rnd, entry["val_accuracy"], entry["clients"])
            state.save("running")
        state.finish()
        state.save("finished")
        return state.result
    except Exception as exc:
        reason = str(exc) if isinstance(exc, RunFailed) else f"{type(exc).__name__}: {exc}"
        log.error("federation run %s failed: %s\n%s", run_id, reason, traceback.format_exc())
        if state is not None:
            state.save("failed", reason)
        else:
            write_result(Path(spec.output_dir), FedResult(
                status="failed", global_checkpoint=None, rounds=[], regions=[], initial_metrics={}, final_metrics={},
                reason=reason, run_id=run_id,
            ))
        raise


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point Flower calls: the spec comes from the run config key ``spec``."""
    raw = context.run_config.get("spec", "")
    if not raw:
        raise RunFailed("run config has no 'spec'; submit runs with federation.runner.FederationClient")
    spec = FedRunSpec.from_dict(json.loads(str(raw)))
    run(grid, spec, str(context.run_id))
