"""Federation runs: validate a round request, submit it to the SuperLink, follow it, hand its model over.

Each run gets a worker thread: submit through ``federation.runner.FederationClient`` (Flower's own
Control API), poll the run's state every ``fed_poll_s``, record what Flower reports, read the
result, gate it and register the new version (``handover``). Every state change is written to the
``federation_runs`` row at once, so a hub restart finds each run where it was: runs Flower still
knows are followed again; runs it does not are failed with the reason. At most one run per model is
queued or running at a time; a second is refused naming the first.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select

from cloud_hub.db.federation import FederationRunRow
from cloud_hub.db.models import utcnow
from cloud_hub.db.session import Database
from cloud_hub.errors import Conflict, InvalidInput, NotFound
from cloud_hub.federation.handover import HandoverError, HandoverPlan, decide_gate, json_safe, register_result
from cloud_hub.federation.sources import initial_checkpoint
from cloud_hub.registry import ModelVersionInfo, RegistryService
from federation.spec import FedResult, FedRunSpec, FedRunState
from shared.federation_api import FedRoundCreate, FedRunPublic

if TYPE_CHECKING:
    from cloud_hub.config import HubSettings

__all__ = ["ACTIVE", "FederationConfig", "FederationService", "RolloutHook", "check_rollout_plan"]

log = logging.getLogger(__name__)

ACTIVE = ("queued", "running")
# Called with the run id, the registered version and the rollout plan; returns what happened, in words.
RolloutHook = Callable[[int, ModelVersionInfo, dict[str, Any]], str]


@dataclass(frozen=True)
class FederationConfig:
    """The federation part of the hub's settings (``HubSettings``), resolved to paths."""

    superlink_address: str
    flwr_home: Path
    output_root: Path
    artifacts_dir: Path
    signing_key: Path
    poll_s: float = 2.0
    unreachable_grace_s: float = 120.0
    gate_metric: str = "val_accuracy"
    gate_min_improvement_pt: float = 0.0
    max_drop_pt: float = 1.0
    app_dir: Path | None = None

    @classmethod
    def from_settings(cls, settings: HubSettings) -> FederationConfig:
        return cls(
            superlink_address=settings.superlink_address,
            flwr_home=settings.flwr_home_dir.resolve(),
            output_root=settings.fed_output_root.resolve(),
            artifacts_dir=settings.artifacts_dir.resolve(),
            signing_key=settings.signing_key_path,
            poll_s=settings.fed_poll_s,
            unreachable_grace_s=settings.fed_unreachable_grace_s,
            gate_metric=settings.fed_gate_metric,
            gate_min_improvement_pt=settings.fed_gate_min_improvement_pt,
            max_drop_pt=settings.fed_max_drop_pt,
        )


class FederationService:
    """Runs in the database, one follower thread per active run; ``start()``/``stop()`` from HubServices."""

    def __init__(
        self,
        db: Database,
        registry: RegistryService,
        config: FederationConfig,
        *,
        on_cloud_registered: Callable[[ModelVersionInfo], object] | None = None,
        rollout_hook: RolloutHook | None = None,
    ) -> None:
        self._db = db
        self._registry = registry
        self.config = config
        self._on_cloud_registered = on_cloud_registered
        self.rollout_hook = rollout_hook
        self._lock = threading.Lock()  # the overlap check and the insert happen as one step
        self._stop = threading.Event()
        self._workers: dict[int, threading.Thread] = {}
        self._client_obj: Any = None

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Pick up runs a previous hub process left active."""
        self._stop.clear()
        with self._db.session() as s:
            active = s.scalars(select(FederationRunRow).where(FederationRunRow.status.in_(ACTIVE))).all()
            pending = [(r.id, r.flower_run_id) for r in active]
        for run_id, flower_id in pending:
            if flower_id is None:
                self._fail(run_id, "the hub stopped before this run reached the SuperLink; submit it again")
            else:
                log.info("resuming federation run %d (Flower run %s) after a hub restart", run_id, flower_id)
                self._spawn(run_id, resume=True)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop following runs; Flower keeps running them and the next start resumes."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for thread in list(self._workers.values()):
            thread.join(max(0.0, deadline - time.monotonic()))
        self._workers.clear()

    # --- requests --------------------------------------------------------------------------
    def submit(
        self, request: FedRoundCreate, *, schedule_id: int | None = None, rollout_plan: dict[str, Any] | None = None
    ) -> FedRunPublic:
        """Validate ``request``, record a queued run and start it; Conflict if the model already has one."""
        info, checkpoint = self.validate(request)
        body = request.model_dump(mode="json")
        plan = rollout_plan if rollout_plan is not None else body.pop("rollout_plan", None)
        body.pop("rollout_plan", None)
        with self._lock:
            with self._db.session() as s:
                running = s.scalars(
                    select(FederationRunRow)
                    .where(FederationRunRow.model_name == info.name, FederationRunRow.status.in_(ACTIVE))
                    .order_by(FederationRunRow.id)
                ).first()
                if running is not None:
                    raise Conflict(
                        f"model {info.name} already has federation run {running.id} ({running.status}, "
                        f"from version {running.parent_version}, created "
                        f"{running.created_at.isoformat(timespec='seconds')}); runs of one model may not "
                        f"overlap: wait for it or cancel it with POST /api/v1/federation/rounds/{running.id}/cancel",
                        kind="federation_overlap",
                    )
                row = FederationRunRow(
                    model_name=info.name,
                    kind=info.kind,
                    parent_version=info.version,
                    strategy=request.strategy,
                    spec={**body, "version": info.version, "task": info.task, "initial_checkpoint": str(checkpoint)},
                    status="queued",
                    stage="submitting",
                    rollout_plan=plan,
                    schedule_id=schedule_id,
                    regions=[],
                    rounds=[],
                    initial_metrics={},
                    final_metrics={},
                    privacy={},
                    gate={},
                    result_versions=[],
                )
                s.add(row)
                s.flush()
                public = _public(row)
        self._spawn(public.id, resume=False)
        return public

    def validate(self, request: FedRoundCreate) -> tuple[ModelVersionInfo, Path]:
        """The version a run of ``request`` starts from and its checkpoint; a HubServiceError naming the
        problem (unknown model or version, a task without federated data, a bad strategy) otherwise."""
        info = self._version(request)
        if request.reference_data is not None:
            if not _is_file(request.reference_data):
                raise InvalidInput(
                    f"reference_data {request.reference_data} is not a file on the hub", kind="bad_request"
                )
        elif info.task not in _task_names():
            raise InvalidInput(
                f"model {info.name} serves task {info.task!r}, which has no reference set on the hub; give "
                f"reference_data (an .npz on the hub's disk) or use a model of {', '.join(_task_names())}",
                kind="bad_request",
            )
        checkpoint = initial_checkpoint(self._registry, info)
        self._check_strategy(request, info, checkpoint)
        if request.rollout_plan is not None:
            check_rollout_plan(request.rollout_plan, info)
        return info, checkpoint

    def cancel(self, run_id: int) -> FedRunPublic:
        """Stop an active run at the SuperLink and record it failed (cancelled); Conflict if it is not active."""
        run = self.get(run_id)
        if run.status not in ACTIVE:
            raise Conflict(
                f"federation run {run_id} is already {run.status}; only queued or running runs can be cancelled"
            )
        note = ""
        if run.flower_run_id:
            try:
                self._client().stop(run.flower_run_id)
            except Exception as exc:  # the record must still say cancelled; the note says what Flower answered
                note = f" (stopping Flower run {run.flower_run_id} failed: {exc})"
        self._finish(run_id, "failed", reason=f"cancelled by the admin{note}", stage="cancelled")
        return self.get(run_id)

    def get(self, run_id: int) -> FedRunPublic:
        with self._db.session() as s:
            row = s.get(FederationRunRow, run_id)
            if row is None:
                raise NotFound(f"no federation run {run_id}")
            return _public(row)

    def list(
        self, *, model_name: str | None = None, status: str | None = None, limit: int = 100, offset: int = 0
    ) -> tuple[list[FedRunPublic], int]:
        """Runs, newest first."""
        query = select(FederationRunRow)
        if model_name:
            query = query.where(FederationRunRow.model_name == model_name)
        if status:
            query = query.where(FederationRunRow.status == status)
        with self._db.session() as s:
            total = s.scalar(select(func.count()).select_from(query.subquery())) or 0
            rows = s.scalars(query.order_by(FederationRunRow.id.desc()).limit(limit).offset(offset)).all()
            return [_public(r) for r in rows], total

    def wait(self, run_id: int, timeout: float) -> FedRunPublic:
        """Block until the run is finished or failed (tests, CLI ``--wait``); TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            run = self.get(run_id)
            if run.status not in ACTIVE:
                return run
            if time.monotonic() > deadline:
                raise TimeoutError(f"federation run {run_id} still {run.status} after {timeout:g} s")
            time.sleep(0.2)

    # --- the worker ------------------------------------------------------------------------
    def _spawn(self, run_id: int, *, resume: bool) -> None:
        thread = threading.Thread(target=self._work, args=(run_id, resume), name=f"fed-run-{run_id}", daemon=True)
        self._workers[run_id] = thread
        thread.start()

    def _work(self, run_id: int, resume: bool) -> None:
        try:
            row = self._row(run_id)
            spec = self._spec(run_id, row.spec)
            flower_id = row.flower_run_id
            if not resume or flower_id is None:
                for stale in ("result.json", "global.pt"):  # left by an earlier database's run of this id
                    (spec.output_dir / stale).unlink(missing_ok=True)
                try:
                    flower_id = str(self._client().submit(spec))
                except Exception as exc:
                    if self._stop.is_set():  # the hub stopped mid-submit; its next start records that
                        return
                    self._fail(run_id, f"submitting to the SuperLink at {self.config.superlink_address} failed: {exc}")
                    return
                if not self._update(
                    run_id, status="running", stage="training", flower_run_id=flower_id, started_at=utcnow()
                ):  # cancelled while it was being submitted: Flower must not go on with it
                    self._stop_flower(flower_id)
                    return
                log.info("federation run %d submitted as Flower run %s", run_id, flower_id)
            state = self._follow(run_id, flower_id, spec)
            if state is None:  # the hub is stopping, or the run was cancelled meanwhile
                return
            self._conclude(run_id, flower_id, spec, state)
        except Exception as exc:  # a bug must still leave the run with a reason, never "running" forever
            log.exception("federation run %d failed in the hub", run_id)
            self._fail(run_id, f"the hub failed while handling this run: {type(exc).__name__}: {exc}")
        finally:
            self._workers.pop(run_id, None)

    def _follow(self, run_id: int, flower_id: str, spec: FedRunSpec) -> FedRunState | None:
        """Poll Flower until the run ends; None when the hub stops or the run stopped being active."""
        # The whole run may take its rounds' timeouts plus slack for start-up, evaluation and hand-over.
        limit_s = spec.rounds * spec.round_timeout_s + 600.0
        began = self._row(run_id).started_at or utcnow()  # counted across hub restarts
        unreachable_since: float | None = None
        while not self._stop.is_set():
            if self._row(run_id).status not in ACTIVE:
                return None
            try:
                state = self._client().status(flower_id)
                unreachable_since = None
            except Exception as exc:
                if self._stop.is_set():  # the hub is stopping (its signal also ended the `flwr` child)
                    return None
                if self._forgotten(flower_id):
                    self._fail(
                        run_id,
                        f"the SuperLink at {self.config.superlink_address} no longer knows Flower run {flower_id} "
                        "(it was restarted without its database?); the run's outcome is lost",
                    )
                    return None
                unreachable_since = unreachable_since or time.monotonic()
                waited = time.monotonic() - unreachable_since
                if waited >= self.config.unreachable_grace_s:
                    self._fail(
                        run_id,
                        f"the SuperLink at {self.config.superlink_address} could not report Flower run "
                        f"{flower_id} for {waited:.0f} s: {exc}",
                    )
                    return None
                state = None
            if state is not None:
                if state.status in ("finished", "failed"):
                    return state
                if state.status == "running":
                    self._update(run_id, status="running", stage="training")
                    self._progress(run_id, spec.output_dir)
            if (utcnow() - began).total_seconds() > limit_s:
                self._stop_flower(flower_id)
                self._fail(
                    run_id,
                    f"no result after {limit_s:.0f} s ({spec.rounds} rounds × {spec.round_timeout_s:g} s round "
                    "timeout + 600 s); the Flower run was stopped",
                )
                return None
            self._stop.wait(self.config.poll_s)
        return None

    def _conclude(self, run_id: int, flower_id: str, spec: FedRunSpec, state: FedRunState) -> None:
        result = self._read_result(spec.output_dir)
        if result is not None:
            self._record(run_id, result)
        if state.status == "failed" or result is None or result.status != "finished":
            if result is not None and result.reason:  # the ServerApp's own words are the most precise
                why = result.reason
            elif state.status == "failed":
                why = state.reason or f"Flower reported run {flower_id} failed without a reason"
            elif result is None:
                why = f"Flower finished run {flower_id} but it left no readable result in {spec.output_dir}"
            else:
                why = f"Flower finished run {flower_id} but its ServerApp reported status {result.status!r}"
            self._fail(run_id, why)
            return
        self._hand_over(run_id, flower_id, spec, result)

    def _hand_over(self, run_id: int, flower_id: str, spec: FedRunSpec, result: FedResult) -> None:
        row = self._row(run_id)
        override = row.spec.get("gate_min_improvement_pt")
        margin = self.config.gate_min_improvement_pt if override is None else float(override)
        gate = decide_gate(result, self.config.gate_metric, margin)
        if not gate.passed:
            self._finish(run_id, "finished", result="rejected by gate", reason=gate.reason, gate=gate.as_dict(),
                         stage="done")
            return
        if not self._update(run_id, stage="registering", gate=gate.as_dict()):
            return  # cancelled after Flower finished: nothing is registered
        plan = HandoverPlan(
            run_id=run_id,
            model_name=row.model_name,
            kind=row.kind,
            parent_version=row.parent_version,
            strategy=row.strategy,
            flower_run_id=flower_id,
            signing_key=self.config.signing_key,
            max_drop_pt=self.config.max_drop_pt,
            reference_limit=spec.reference_limit,
            extra_lineage={"schedule_id": row.schedule_id} if row.schedule_id else {},
        )
        try:
            info = register_result(self._registry, self.config.artifacts_dir, plan, result, gate)
        except HandoverError as exc:
            self._fail(run_id, f"{gate.reason}, but the new version was not registered: {exc}", gate=gate.as_dict())
            return
        ref = f"{info.name}:{info.version}"
        if info.kind == "cloud" and self._on_cloud_registered is not None:
            try:
                self._on_cloud_registered(info)
            except Exception as exc:  # registered and kept; serving it waits for the next restart
                log.error("federated cloud version %s registered but not activated: %s", ref, exc)
        rollout = self._start_rollout(run_id, info, row.rollout_plan)
        self._finish(run_id, "finished", result="registered", reason=f"{gate.reason}; registered {ref}",
                     result_versions=[ref], rollout=rollout, stage="done")
        log.info("federation run %d registered %s", run_id, ref)

    def _start_rollout(self, run_id: int, info: ModelVersionInfo, plan: dict[str, Any] | None) -> str:
        """The one hook to the rollout controller: what happened with the requested rollout, in words."""
        if plan is None:
            return ""
        if self.rollout_hook is None:
            return "rollout requested but not available on this hub"
        try:
            return self.rollout_hook(run_id, info, plan) or "rollout started"
        except Exception as exc:  # the version stays registered; the record says why it was not rolled out
            log.exception("rollout of %s:%s failed to start", info.name, info.version)
            return f"rollout requested but it could not start: {exc}"

    # --- helpers ---------------------------------------------------------------------------
    def _version(self, request: FedRoundCreate) -> ModelVersionInfo:
        if request.version:
            return self._registry.get_version(request.model_name, request.version)
        return self._registry.latest_version(request.model_name)

    def _check_strategy(self, request: FedRoundCreate, info: ModelVersionInfo, checkpoint: Path) -> None:
        from federation.strategies import StrategyConfigError, check_strategy

        try:
            spec = self._spec_from(request.model_dump(mode="json"), info.kind, info.task, checkpoint, Path("."))
            check_strategy(spec)
        except (StrategyConfigError, TypeError, ValueError) as exc:
            raise InvalidInput(f"invalid federation request: {exc}", kind="bad_request") from None

    def _spec(self, run_id: int, stored: dict[str, Any]) -> FedRunSpec:
        row = self._row(run_id)
        out = self.config.output_root / f"run-{run_id}"
        out.mkdir(parents=True, exist_ok=True)
        checkpoint = Path(stored["initial_checkpoint"])
        return self._spec_from(stored, row.kind, stored["task"], checkpoint, out, row.parent_version)

    @staticmethod
    def _spec_from(
        body: dict[str, Any], kind: str, task: str, checkpoint: Path, out: Path, parent: str = ""
    ) -> FedRunSpec:
        return FedRunSpec(
            model_name=body["model_name"],
            kind=kind,  # type: ignore[arg-type]
            task=task,
            initial_checkpoint=checkpoint,
            output_dir=out,
            parent_version=parent,
            strategy=body["strategy"],
            strategy_params=dict(body.get("strategy_params") or {}),
            rounds=body["rounds"],
            local_epochs=body["local_epochs"],
            lr=body["lr"],
            batch_size=body["batch_size"],
            soft_weight=body["soft_weight"],
            min_available=body["min_available"],
            min_fit=body["min_fit"],
            fraction_fit=body["fraction_fit"],
            fraction_evaluate=body.get("fraction_evaluate", 1.0),
            round_timeout_s=body["round_timeout_s"],
            differential_privacy=body.get("differential_privacy"),
            secagg=body.get("secagg"),
            reference_limit=body.get("reference_limit"),
            reference_data=Path(body["reference_data"]) if body.get("reference_data") else None,
        )

    def _client(self) -> Any:
        if self._client_obj is None:
            from federation.runner import FederationClient

            self.config.flwr_home.mkdir(parents=True, exist_ok=True)
            kwargs = {"app_dir": self.config.app_dir} if self.config.app_dir else {}
            self._client_obj = FederationClient(self.config.superlink_address, self.config.flwr_home, **kwargs)
        return self._client_obj

    def _forgotten(self, flower_id: str) -> bool:
        """True when the SuperLink answers but does not list ``flower_id``; False when it cannot answer."""
        try:
            runs = self._client().list_runs()
        except Exception:  # unreachable: not known to be forgotten
            return False
        return all(str(r.get("run-id")) != str(flower_id) for r in runs)

    def _stop_flower(self, flower_id: str) -> None:
        try:
            self._client().stop(flower_id)
        except Exception as exc:  # the run is failed either way; the log keeps Flower's answer
            log.warning("could not stop Flower run %s: %s", flower_id, exc)

    def _read_result(self, output_dir: Path) -> FedResult | None:
        try:
            return self._client().read_result(output_dir)  # type: ignore[no-any-return]
        except Exception as exc:  # no or unreadable result.json: the caller says so in the record
            log.warning("no readable federation result in %s: %s", output_dir, exc)
            return None

    def _progress(self, run_id: int, output_dir: Path) -> None:
        """Record the rounds done so far: the ServerApp rewrites result.json after every round."""
        from federation.runner import read_result

        try:
            result = read_result(output_dir)
        except (OSError, ValueError):  # not written yet, or caught mid-write: the next poll reads it
            return
        self._record(run_id, result)

    def _record(self, run_id: int, result: FedResult) -> None:
        self._update(
            run_id,
            regions=list(result.regions),
            rounds=[dict(r) for r in result.rounds],
            initial_metrics=dict(result.initial_metrics),
            final_metrics=dict(result.final_metrics),
            privacy=dict(result.privacy),
        )

    def _row(self, run_id: int) -> FederationRunRow:
        with self._db.session() as s:
            row = s.get(FederationRunRow, run_id)
            if row is None:
                raise NotFound(f"no federation run {run_id}")
            return row

    def _update(self, run_id: int, **fields: Any) -> bool:
        """Set ``fields`` while the run is still active; False (and nothing written) once it has ended."""
        with self._db.session() as s:
            row = s.get(FederationRunRow, run_id, with_for_update=True)
            if row is None or row.status not in ACTIVE:
                return False
            for key, value in fields.items():
                setattr(row, key, json_safe(value) if isinstance(value, (dict, list)) else value)
            return True

    def _finish(self, run_id: int, status: str, **fields: Any) -> bool:
        return self._update(run_id, status=status, finished_at=utcnow(), **fields)

    def _fail(self, run_id: int, reason: str, **fields: Any) -> bool:
        log.warning("federation run %d failed: %s", run_id, reason)
        return self._finish(run_id, "failed", reason=reason, **{"stage": "failed", **fields})


def _public(row: FederationRunRow) -> FedRunPublic:
    return FedRunPublic.model_validate(row, from_attributes=True)


def _is_file(path: str) -> bool:
    try:
        return Path(path).is_file()
    except (OSError, ValueError):  # a NUL byte or an over-long name is not a file either
        return False


def _task_names() -> list[str]:
    from shared.data import TASKS

    return sorted(TASKS)


def check_rollout_plan(plan: dict[str, Any], info: ModelVersionInfo) -> None:
    """InvalidInput naming the problem if ``plan`` cannot become a rollout of a version of ``info``'s model."""
    from pydantic import ValidationError

    from shared.rollouts import RolloutCreate

    if info.kind != "edge":
        raise InvalidInput(f"model {info.name} is a cloud model; only edge models are rolled out to devices")
    try:
        RolloutCreate.model_validate({**plan, "model_name": info.name, "version": info.version})
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(map(str, err["loc"])) or "rollout_plan"
        raise InvalidInput(f"invalid rollout_plan at {where}: {err['msg']}", kind="bad_request") from None
