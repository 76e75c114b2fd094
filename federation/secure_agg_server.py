"""The ServerApp side of SecAgg+: one round's training through Flower's ``SecAggPlusWorkflow``.

Flower 1.41 has no message-API secure aggregation: SecAgg+ exists only as the legacy
``SecAggPlusWorkflow`` (a ``DefaultWorkflow`` fit step), which drives a legacy ``Strategy`` through a
``LegacyContext``. edgefed keeps its own round loop (reference evaluation, region metrics, failures,
``result.json``) and, for runs with ``secagg`` set, calls the workflow once per round in place of the
message-API ``configure_train``/``aggregate_train``:

1. a ``LegacyContext`` holds the current global weights, the round number, the legacy strategy of the
   run's strategy name and parameters (``federation.strategies.build_legacy_strategy``) and a client
   manager with the SuperNodes connected now;
2. the workflow's four stages (setup, share keys, collect masked vectors, unmask) each send one
   ``train`` message per sampled region (``federation.secure_agg.secagg_mod`` answers them) and wait
   up to ``timeout`` seconds for the replies;
3. the server only ever sees the masked, quantised updates and their weighted sum, which the strategy
   then aggregates (FedAvg's average of identical sums, FedAdam's server step on it, ...).

The round's facts (shares and threshold actually used, regions sampled / masked / dropped, time per
stage, where the protocol stopped) go into the round's ``secagg`` entry.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server import ServerConfig, SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid

from federation.messaging import send_and_receive
from federation.secure_agg import ARRAY_NAMES_KEY
from federation.spec import FedRunSpec
from federation.strategies import build_legacy_strategy, secagg_settings

__all__ = ["SecAggRound", "SecAggTrainer"]


@dataclass
class SecAggRound:
    """What one SecAgg+ training round produced."""

    arrays: dict[str, np.ndarray] | None  # the new global weights; None when the protocol stopped
    sampled: int  # regions the strategy sampled
    replies: dict[str, dict[str, Any]] = field(default_factory=dict)  # region -> its training metrics
    failures: list[str] = field(default_factory=list)
    train_metrics: dict[str, Any] = field(default_factory=dict)  # weighted by num-examples
    record: dict[str, Any] = field(default_factory=dict)  # the round's ``secagg`` entry
    unmask_s: float = 0.0  # the last stage: collecting key shares, unmasking, the strategy's aggregation


class _PolledGrid:
    """The run's grid, with replies collected by ``federation.messaging`` (short poll) for the workflow."""

    def __init__(self, grid: Grid, timeout: float) -> None:
        self._grid = grid
        self._timeout = timeout

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Message]:
        return send_and_receive(self._grid, messages, timeout=self._timeout if timeout is None else timeout)


class _Workflow(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, keeping its per-round state and the time each stage took."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.state: Any = None
        self.stage_s: dict[str, float] = {}
        self.stopped_at: str | None = None

    def _stage(self, name: str, step: Any, grid: Any, context: Any, state: Any) -> bool:
        self.state = state
        t0 = time.perf_counter()
        ok = bool(step(grid, context, state))
        self.stage_s[name] = round(time.perf_counter() - t0, 4)
        if not ok:
            self.stopped_at = name
        return ok

    def setup_stage(self, grid: Any, context: Any, state: Any) -> bool:
        return self._stage("setup", super().setup_stage, grid, context, state)

    def share_keys_stage(self, grid: Any, context: Any, state: Any) -> bool:
        return self._stage("share_keys", super().share_keys_stage, grid, context, state)

    def collect_masked_vectors_stage(self, grid: Any, context: Any, state: Any) -> bool:
        return self._stage("collect_masked_vectors", super().collect_masked_vectors_stage, grid, context, state)

    def unmask_stage(self, grid: Any, context: Any, state: Any) -> bool:
        return self._stage("unmask", super().unmask_stage, grid, context, state)


def _error_reason(exc: Exception) -> str:
    err = exc.args[0] if exc.args else exc
    return str(getattr(err, "reason", err))


class SecAggTrainer:
    """Runs the training half of each round of one run through SecAgg+ (see the module docstring)."""

    def __init__(self, spec: FedRunSpec, arrays: dict[str, np.ndarray], train_config: dict[str, Any]) -> None:
        settings = secagg_settings(spec)
        if settings is None:
            raise ValueError("SecAggTrainer needs a spec with secagg set")
        self.settings = settings
        self.names = list(arrays)
        self.train_config = dict(train_config)
        self.strategy = build_legacy_strategy(spec, [arrays[n] for n in self.names], self._fit_config)

    def _fit_config(self, server_round: int) -> dict[str, Any]:
        return {**self.train_config, ARRAY_NAMES_KEY: json.dumps(self.names), "server-round": server_round}

    def _workflow(self) -> _Workflow:
        s = self.settings
        return _Workflow(
            num_shares=s["num_shares"], reconstruction_threshold=s["reconstruction_threshold"],
            max_weight=s["max_weight"], clipping_range=s["clipping_range"],
            quantization_range=s["quantization_range"], modulus_range=s["modulus_range"], timeout=s["timeout"],
        )

    def train_round(self, grid: Grid, rnd: int, arrays: dict[str, np.ndarray]) -> SecAggRound:
        """One round of SecAgg+ training from ``arrays``; the result says who took part and what failed."""
        manager = SimpleClientManager()
        run_id = grid.run.run_id
        for node_id in grid.get_node_ids():
            manager.register(GridClientProxy(node_id=node_id, grid=grid, run_id=run_id))
        base = Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config={})
        context = LegacyContext(base, config=ServerConfig(num_rounds=rnd), strategy=self.strategy,
                                client_manager=manager)
        start = compat.parameters_to_arrayrecord(ndarrays_to_parameters([arrays[n] for n in self.names]), True)
        context.state.array_records[MAIN_PARAMS_RECORD] = start
        context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: rnd})
        workflow = self._workflow()
        workflow(_PolledGrid(grid, float(self.settings["timeout"])), context)  # type: ignore[arg-type]
        return self._outcome(workflow, context, start)

    def _outcome(self, workflow: _Workflow, context: LegacyContext, start: Any) -> SecAggRound:
        state = workflow.state
        sampled = sorted(state.sampled_node_ids) if state is not None else []
        results = list(state.legacy_results) if state is not None else []
        out = SecAggRound(arrays=None, sampled=len(sampled))
        contributed = set()
        records = []
        for proxy, fitres in results:
            contributed.add(proxy.node_id)
            metrics = dict(fitres.metrics)
            region = str(metrics.pop("region", f"node-{proxy.node_id}"))
            numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            out.replies[region] = {k: (None if isinstance(v, float) and math.isnan(v) else v)
                                   for k, v in numeric.items()}
            records.append(RecordDict({"metrics": MetricRecord(numeric)}))
        reasons = sorted({_error_reason(e) for e in (state.failures if state is not None else [])})
        out.failures = [f"SecAgg+ reply with an error: {r}" for r in reasons]
        dropped = [n for n in sampled if n not in contributed]
        out.failures += [f"node {n}: dropped out of SecAgg+ before its masked update arrived" for n in dropped]
        if records:
            from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

            agg = aggregate_metricrecords(records, "num-examples") if all(
                "num-examples" in r["metrics"] for r in records) else MetricRecord()
            out.train_metrics = dict(agg)
        new = context.state.array_records[MAIN_PARAMS_RECORD]
        if workflow.stopped_at is None and new is not start:
            params = compat.arrayrecord_to_parameters(new, keep_input=True)
            out.arrays = dict(zip(self.names, parameters_to_ndarrays(params), strict=True))
        out.unmask_s = workflow.stage_s.get("unmask", 0.0)
        out.record = {
            "num_shares": int(state.num_shares) if state is not None else None,
            "reconstruction_threshold": int(state.threshold) if state is not None else None,
            "sampled": len(sampled),
            "masked_updates": len(results),
            "dropped": len(dropped),
            "stage_s": dict(workflow.stage_s),
            "stopped_at": workflow.stopped_at,
        }
        return out
