"""The rollout controller: canary, staged waves, health gates, automatic rollback.

Everything it knows lives in the database (``rollouts``, ``rollout_devices``, ``device_health``);
a tick reads it, acts, and writes it back, so a hub restarted in the middle of a wave carries on
where it was. A tick (every ``tick_s`` on its own thread):

1. writes buffered telemetry samples, and re-publishes retained assignments after a reconnection;
2. for each running rollout: fails it at once when more devices than allowed could not load the
   bundle; otherwise, once the wave's window is over, evaluates the gates over that window (the
   devices on the new version against the target's devices still on their previous version) and
   promotes (next wave, or done), waits for a manual promote, keeps observing (too few cases yet),
   or rolls back.

A rollback pins every device that got the new version back to the exact version it ran when the
rollout started. Devices of later waves never received anything. One device belongs to at most one
active rollout, so two rollouts never fight over a device.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from cloud_hub.db.models import DeviceRow, utcnow
from cloud_hub.db.rollouts import RolloutDeviceRow, RolloutRow
from cloud_hub.db.session import Database
from cloud_hub.devices import DeviceService
from cloud_hub.errors import Conflict, InvalidInput, NotFound
from cloud_hub.registry import ModelVersionInfo, RegistryService
from cloud_hub.rollouts.gates import Aggregate, evaluate, failed_summary
from cloud_hub.rollouts.health import HealthRecorder
from cloud_hub.rollouts.publisher import AssignmentPublisher
from shared.rollouts import (
    ACTIVE_STATES,
    RolloutCreate,
    RolloutDevicePublic,
    RolloutEvent,
    RolloutPublic,
    WavePublic,
)

__all__ = ["RolloutController"]

log = logging.getLogger(__name__)

_MAX_EVENTS = 200
_PRUNE_EVERY = 500  # ticks


class RolloutController:
    """Rollouts over the fleet; the public methods are thread-safe and map to the REST API."""

    def __init__(
        self,
        db: Database,
        devices: DeviceService,
        registry: RegistryService,
        health: HealthRecorder,
        publisher: AssignmentPublisher,
        *,
        tick_s: float = 2.0,
        lookback_s: float = 300.0,
    ) -> None:
        self._db = db
        self._devices = devices
        self._registry = registry
        self.health = health
        self.publisher = publisher
        self.tick_s = tick_s
        self.lookback_s = lookback_s
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ticks = 0

    # --- lifecycle -------------------------------------------------------------------------------
    def start_ticking(self) -> None:
        self._stop.clear()
        self.publisher.resync.set()
        self._thread = threading.Thread(target=self._run, name="hub-rollouts", daemon=True)
        self._thread.start()

    def stop_ticking(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        try:
            self.health.flush()
        except Exception:  # the database may already be gone; samples are telemetry, not state
            log.warning("could not write the last health samples", exc_info=True)

    def request_republish(self) -> None:
        """paho thread, after a (re)connection: re-publish all retained assignments on the next tick."""
        self.publisher.resync.set()

    def _run(self) -> None:
        while not self._stop.wait(self.tick_s):
            try:
                self.tick()
            except Exception:  # the controller must survive a bad tick; the next one retries
                log.exception("rollout tick failed")

    # --- the API ---------------------------------------------------------------------------------
    def start_handover(self, run_id: int, info: ModelVersionInfo, plan: dict[str, Any]) -> str:
        """The federation hand-over: start ``plan`` (a rollout plan without model and version, as a schedule
        or round request carries it) for the version federation run ``run_id`` registered; returns what
        happened, in words, for the run's record. Raises as :meth:`start` does."""
        rollout = self.start({**plan, "model_name": info.name, "version": info.version})
        return f"rollout {rollout.id} started for {info.name}:{info.version} (federation run {run_id})"

    def start(self, plan: RolloutCreate | dict[str, Any]) -> RolloutPublic:
        """Create and start a rollout from ``plan`` (a ``shared.rollouts.RolloutCreate`` or its dict).

        The canary group is assigned the new version at once. Raises InvalidInput (bad plan, no
        devices), NotFound (unknown model, version or device) or Conflict (a device of the target is
        in another active rollout). This is what a federation schedule calls to hand a new model over:
        ``services.rollouts.start(RolloutCreate(version=new_version, **schedule_plan))``.
        """
        if not isinstance(plan, RolloutCreate):
            try:
                plan = RolloutCreate.model_validate(plan)
            except ValueError as exc:
                raise InvalidInput(f"rollout plan is invalid: {exc}") from None
        model = plan.model_name or self._devices.default_model_name
        info = self._registry.get_version(model, plan.version)
        if info.kind != "edge":
            raise InvalidInput(f"{model}:{plan.version} is a {info.kind} model; rollouts deliver edge bundles")
        with self._lock:
            with self._db.session() as s:
                targets = self._resolve_target(s, plan, model)
                self._check_no_overlap(s, {d.device_id for d in targets})
                order, wave_sizes = self._plan_waves(plan, targets)
                previous = {d.device_id: d.running_version or d.assigned_version for d in targets}
            for device_id, version in previous.items():
                if version is None:  # never contacted: what it would get now is what it "ran"
                    previous[device_id] = self._devices.assignment(device_id).version
            now = utcnow()
            waves = [
                WavePublic(
                    index=i,
                    name="canary" if i == 0 else f"wave {i}",
                    percent=round(100.0 * size / len(order), 2),
                    window_s=window,
                    devices=size - (wave_sizes[i - 1][0] if i else 0),
                ).model_dump(mode="json")
                for i, (size, window) in enumerate(wave_sizes)
            ]
            with self._db.session() as s:
                row = RolloutRow(
                    model_name=model,
                    version=plan.version,
                    state="running",
                    plan=plan.model_dump(mode="json") | {"model_name": model},
                    current_wave=0,
                    wave_started_at=now,
                    waves=waves,
                    events=[],
                    created_at=now,
                    updated_at=now,
                )
                s.add(row)
                s.flush()
                for pos, device_id in enumerate(order):
                    s.add(RolloutDeviceRow(rollout_id=row.id, device_id=device_id, position=pos,
                                           previous_version=previous[device_id]))
                s.flush()
                _event(row, "started", 0, f"{model}:{plan.version} to {plan.target.describe()}: "
                       f"{len(order)} devices in {len(waves)} wave(s)")
                canary = self._begin_wave(s, row, 0)  # in the same transaction as the rollout itself
                rollout_id = row.id
            log.info("rollout %d started: %s:%s to %d devices", rollout_id, model, plan.version, len(order))
            for device_id in canary:
                self._devices.assign(device_id, plan.version)
            return self.get(rollout_id)

    def get(self, rollout_id: int) -> RolloutPublic:
        with self._db.session() as s:
            return self._public(s, self._row(s, rollout_id))

    def list(self, state: str | None = None, limit: int = 100, offset: int = 0) -> tuple[list[RolloutPublic], int]:
        with self._db.session() as s:
            conds = [RolloutRow.state == state] if state else []
            total = s.scalar(select(func.count()).select_from(RolloutRow).where(*conds)) or 0
            rows = s.scalars(
                select(RolloutRow).where(*conds).order_by(RolloutRow.id.desc()).limit(limit).offset(offset)
            ).all()
            return [self._public(s, r) for r in rows], total

    def pause(self, rollout_id: int, reason: str = "") -> RolloutPublic:
        """Stop judging and promoting; devices keep what they were assigned."""
        with self._lock:
            with self._db.session() as s:
                row = self._row(s, rollout_id)
                self._require(row, ("running", "awaiting_promotion"), "pause")
                row.state = "paused"
                _event(row, "paused", row.current_wave, reason or "paused by the admin")
        return self.get(rollout_id)

    def resume(self, rollout_id: int, reason: str = "") -> RolloutPublic:
        """Continue a paused rollout; the current wave's observation window starts again."""
        with self._lock:
            with self._db.session() as s:
                row = self._row(s, rollout_id)
                self._require(row, ("paused",), "resume")
                row.state = "running"
                row.wave_started_at = utcnow()
                _event(row, "resumed", row.current_wave, reason or "resumed by the admin; window restarts")
        return self.get(rollout_id)

    def promote(self, rollout_id: int, reason: str = "") -> RolloutPublic:
        """Go to the next wave now (after a passed wave waiting for it, or skipping the rest of a window)."""
        with self._lock:
            with self._db.session() as s:
                row = self._row(s, rollout_id)
                self._require(row, ("running", "awaiting_promotion"), "promote")
                wave = row.current_wave
                if row.state == "running":
                    self._set_wave(row, wave, decision="promoted_manually", decided_at=_iso(utcnow()),
                                   detail=reason or "promoted by the admin before its gates were judged")
                _event(row, "promoted", wave, reason or "promoted by the admin")
                last = wave + 1 >= len(row.waves)
                if last:
                    self._finish(row, "succeeded", "every wave done")
            if not last:
                self._start_wave(rollout_id, wave + 1)
        return self.get(rollout_id)

    def rollback(self, rollout_id: int, reason: str = "") -> RolloutPublic:
        """Return every device that got the new version to the exact version it ran before."""
        with self._lock:
            with self._db.session() as s:
                row = self._row(s, rollout_id)
                self._require(row, ACTIVE_STATES, "roll back")
                detail = reason or "rolled back by the admin"
                self._set_wave(row, row.current_wave, decision="rolled_back_manually", decided_at=_iso(utcnow()),
                               detail=detail)
                row.failure = {"wave": row.current_wave, "gates": [], "summary": detail, "manual": True}
            self._roll_back(rollout_id, detail)
        return self.get(rollout_id)

    # --- the tick --------------------------------------------------------------------------------
    def tick(self) -> None:
        """Write telemetry, re-publish assignments if needed, advance every running rollout."""
        self.health.flush()
        self._ticks += 1
        if self._ticks % _PRUNE_EVERY == 0:
            self.health.prune()
        if self.publisher.resync.is_set() and self.publisher.connected:
            self.publisher.resync.clear()
            n = self.publisher.republish_all()
            log.info("re-published %d retained assignment(s)", n)
        with self._db.session() as s:
            running = s.scalars(select(RolloutRow.id).where(RolloutRow.state == "running")).all()
        with self._lock:
            self._reconcile()
        for rollout_id in running:
            with self._lock:
                self._advance(rollout_id)

    def _reconcile(self) -> None:
        """Devices an active rollout assigned but whose pin differs (a crash between the commit of a wave
        and the assignments, or an edit behind the rollout's back) are assigned the version again."""
        with self._db.session() as s:
            stray = s.execute(
                select(RolloutDeviceRow.device_id, RolloutRow.version)
                .join(RolloutRow, RolloutRow.id == RolloutDeviceRow.rollout_id)
                .join(DeviceRow, DeviceRow.device_id == RolloutDeviceRow.device_id)
                .where(RolloutRow.state.in_(ACTIVE_STATES), RolloutDeviceRow.wave.is_not(None),
                       or_(DeviceRow.assigned_version.is_(None), DeviceRow.assigned_version != RolloutRow.version))
            ).all()
        for device_id, version in stray:
            log.warning("device %s should run %s for its rollout; assigning it again", device_id, version)
            self._devices.assign(device_id, version)

    def _advance(self, rollout_id: int) -> None:
        now = utcnow()
        with self._db.session() as s:
            row = self._row(s, rollout_id)
            if row.state != "running" or row.wave_started_at is None:
                return
            plan = RolloutCreate.model_validate(row.plan)
            wave = row.current_wave
            devs = s.scalars(select(RolloutDeviceRow).where(RolloutDeviceRow.rollout_id == rollout_id)).all()
            assigned = {d.device_id: d.assigned_at for d in devs if d.wave is not None and d.assigned_at}
            waiting = [d.device_id for d in devs if d.wave is None]
            failures = self.health.update_errors(assigned, row.version, plan.gates.load_grace_s)
            window_over = now - row.wave_started_at >= timedelta(seconds=row.waves[wave]["window_s"])
            if not window_over and len(failures) <= plan.gates.max_load_failures:
                return
            start = row.wave_started_at
            cand = self.health.aggregate(assigned, row.model_name, start, now, lambda v: v == row.version,
                                         self.lookback_s)
            base = self.health.aggregate(waiting, row.model_name, start, now, lambda v: v != row.version,
                                         self.lookback_s)
            if base.requests >= plan.gates.min_requests:
                row.baseline = base.to_dict()
            elif row.baseline is not None:
                base = Aggregate.from_dict(row.baseline)
            else:
                base = None  # type: ignore[assignment]
            verdict, gates = evaluate(plan.gates, cand, base, sorted(failures))
            gate_dicts = [g.model_dump(mode="json") for g in gates]
            if verdict is None:
                self._set_wave(row, wave, decision="observing", gates=gate_dicts,
                               detail="window over; waiting for enough cases on the new version")
                return
            self._set_wave(row, wave, decision="passed" if verdict else "failed", gates=gate_dicts,
                           decided_at=_iso(now), detail="" if verdict else failed_summary(gates))
            if not verdict:
                summary = f"{row.waves[wave]['name']} failed its gates: {failed_summary(gates)}"
                row.failure = {"wave": wave, "gates": [g for g in gate_dicts if g["passed"] is False],
                               "summary": summary, "manual": False}
                log.warning("rollout %d: %s", rollout_id, summary)
            else:
                _event(row, "wave_passed", wave, f"{row.waves[wave]['name']} passed its gates")
                last = wave + 1 >= len(row.waves)
                if last:
                    self._finish(row, "succeeded", "every wave passed its gates")
                elif plan.manual_promote:
                    row.state = "awaiting_promotion"
                    _event(row, "awaiting_promotion", wave, "waiting for a manual promote")
        if verdict is False:
            self._roll_back(rollout_id, summary)
        elif verdict and not last and not plan.manual_promote:
            self._start_wave(rollout_id, wave + 1)

    # --- transitions -----------------------------------------------------------------------------
    def _start_wave(self, rollout_id: int, wave: int) -> None:
        """Assign the new version to the devices of ``wave`` and start its window."""
        with self._db.session() as s:
            row = self._row(s, rollout_id)
            ids = self._begin_wave(s, row, wave)
            version = row.version
        # Committed first: after a crash in between, the tick's reconciliation assigns them.
        for device_id in ids:
            self._devices.assign(device_id, version)

    def _begin_wave(self, s: Session, row: RolloutRow, wave: int) -> list[str]:
        """Mark the devices of ``wave`` as assigned and start its window (in ``s``); their ids."""
        now = utcnow()
        size = _cumulative_sizes(row.waves)[wave]
        devs = s.scalars(
            select(RolloutDeviceRow)
            .where(RolloutDeviceRow.rollout_id == row.id, RolloutDeviceRow.position < size,
                   RolloutDeviceRow.wave.is_(None))
            .order_by(RolloutDeviceRow.position)
        ).all()
        for d in devs:
            d.wave, d.assigned_at = wave, now
        row.current_wave = wave
        row.wave_started_at = now
        row.state = "running"
        self._set_wave(row, wave, decision="observing", started_at=_iso(now))
        _event(row, "wave_started", wave, f"{row.waves[wave]['name']}: {len(devs)} device(s) get "
               f"{row.model_name}:{row.version}")
        return [d.device_id for d in devs]

    def _roll_back(self, rollout_id: int, detail: str) -> None:
        with self._db.session() as s:
            devs = s.scalars(select(RolloutDeviceRow).where(RolloutDeviceRow.rollout_id == rollout_id,
                                                            RolloutDeviceRow.wave.is_not(None))).all()
            restore = [(d.device_id, d.previous_version) for d in devs]
        # Devices first, state second: a crash in between leaves the rollout active, and the next
        # tick judges (and rolls back) again; never a finished rollout with devices left on the version.
        for device_id, version in restore:
            if version is not None:
                self._devices.assign(device_id, version)
        with self._db.session() as s:
            self._finish(self._row(s, rollout_id), "rolled_back", detail)
        log.warning("rollout %d rolled back: %d device(s) return to their previous version", rollout_id,
                    len(restore))

    @staticmethod
    def _finish(row: RolloutRow, state: str, detail: str) -> None:
        row.state = state
        row.finished_at = utcnow()
        _event(row, state, row.current_wave, detail)

    @staticmethod
    def _set_wave(row: RolloutRow, wave: int, **changes: Any) -> None:
        waves = [dict(w) for w in row.waves]
        waves[wave].update(changes)
        row.waves = waves
        row.updated_at = utcnow()

    # --- planning --------------------------------------------------------------------------------
    def _resolve_target(self, s: Session, plan: RolloutCreate, model: str) -> list[DeviceRow]:
        q = select(DeviceRow).where(DeviceRow.model_name == model)
        t = plan.target
        if t.devices:
            wanted = sorted(set(t.devices))
            rows = [r for i in range(0, len(wanted), 500)
                    for r in s.scalars(select(DeviceRow).where(DeviceRow.device_id.in_(wanted[i : i + 500])))]
            missing = sorted(set(t.devices) - {r.device_id for r in rows})
            if missing:
                raise NotFound(f"target devices not registered: {', '.join(missing[:20])}")
            other = sorted(r.device_id for r in rows if r.model_name != model)
            if other:
                raise InvalidInput(f"target devices {', '.join(other[:20])} run another model than {model!r}")
            return list(rows)
        if t.regions:
            q = q.where(DeviceRow.region.in_(set(t.regions)))
        rows = s.scalars(q).all()
        if not rows:
            raise InvalidInput(f"no device of model {model!r} in the target ({t.describe()}); nothing to roll out")
        return list(rows)

    def _check_no_overlap(self, s: Session, device_ids: set[str]) -> None:
        busy = s.execute(
            select(RolloutRow.id, RolloutRow.model_name, RolloutRow.version, RolloutRow.state,
                   RolloutDeviceRow.device_id)
            .join(RolloutDeviceRow, RolloutDeviceRow.rollout_id == RolloutRow.id)
            .where(RolloutRow.state.in_(ACTIVE_STATES))
        ).all()
        clash = [b for b in busy if b.device_id in device_ids]
        if clash:
            first = clash[0]
            ids = sorted({b.device_id for b in clash})
            raise Conflict(
                f"rollout {first.id} ({first.model_name}:{first.version}, {first.state}) is still active on "
                f"{len(ids)} device(s) of this target ({', '.join(ids[:5])}{' ...' if len(ids) > 5 else ''}); "
                f"one rollout per device at a time: wait for it to finish, or roll it back"
            )

    @staticmethod
    def _plan_waves(plan: RolloutCreate, targets: list[DeviceRow]) -> tuple[list[str], list[tuple[int, float]]]:
        """Device order (canary first) and each wave's cumulative size and window; empty waves are dropped."""
        n = len(targets)
        ids = {d.device_id for d in targets}
        if plan.canary_devices:
            unknown = sorted(set(plan.canary_devices) - ids)
            if unknown:
                raise InvalidInput(f"canary devices {', '.join(unknown[:20])} are not in the rollout's target")
            canary = list(dict.fromkeys(plan.canary_devices))
        else:
            size = plan.canary_count or 1
            if plan.canary_percent is not None:
                size = max(1, math.ceil(plan.canary_percent * n / 100))
            # Online devices first: a canary needs traffic to be judged.
            ranked = sorted(targets, key=lambda d: (not d.online, _stable(plan.version, d.device_id)))
            canary = [d.device_id for d in ranked[: min(size, n)]]
        rest = sorted(ids - set(canary), key=lambda d: _stable(plan.version, d))
        order = canary + rest
        sizes = [(len(canary), plan.canary_window_s or plan.window_s)]
        for w in plan.waves:
            size = max(math.ceil(w.percent * n / 100 - 1e-9), sizes[-1][0])
            if size > sizes[-1][0]:
                sizes.append((size, w.window_s or plan.window_s))
        return order, sizes

    # --- views -----------------------------------------------------------------------------------
    def _public(self, s: Session, row: RolloutRow) -> RolloutPublic:
        devs = s.scalars(select(RolloutDeviceRow).where(RolloutDeviceRow.rollout_id == row.id)
                         .order_by(RolloutDeviceRow.position)).all()
        fleet = {d.device_id: d for d in s.scalars(
            select(DeviceRow).where(DeviceRow.device_id.in_([d.device_id for d in devs]))).all()}
        plan = RolloutCreate.model_validate(row.plan)
        assigned = {d.device_id: d.assigned_at for d in devs if d.wave is not None and d.assigned_at}
        failed = (self.health.update_errors(assigned, row.version, plan.gates.load_grace_s)
                  if row.state in ACTIVE_STATES else {})
        out, counts = [], dict.fromkeys(("waiting", "pending", "running", "failed", "restored", "restoring"), 0)
        for d in devs:
            f = fleet.get(d.device_id)
            running = f.running_version if f else None
            if d.wave is None:
                status = "waiting"
            elif row.state == "rolled_back":
                status = "restored" if running == d.previous_version else "restoring"
            elif running == row.version:
                status = "running"
            elif d.device_id in failed:
                status = "failed"
            else:
                status = "pending"
            counts[status] += 1
            out.append(RolloutDevicePublic(
                device_id=d.device_id, wave=d.wave, previous_version=d.previous_version,
                assigned_version=f.assigned_version if f else None, running_version=running,
                online=bool(f and f.online), status=status,  # type: ignore[arg-type]
            ))
        return RolloutPublic(
            id=row.id, model_name=row.model_name, version=row.version, state=row.state,  # type: ignore[arg-type]
            target=plan.target.describe(), current_wave=row.current_wave, plan=plan,
            waves=[WavePublic.model_validate(w) for w in row.waves], devices=out, counts=counts,
            events=[RolloutEvent.model_validate(e) for e in row.events], failure=row.failure,
            created_at=row.created_at, updated_at=row.updated_at, finished_at=row.finished_at,
        )

    @staticmethod
    def _row(s: Session, rollout_id: int) -> RolloutRow:
        row = s.get(RolloutRow, rollout_id)
        if row is None:
            raise NotFound(f"no rollout {rollout_id}")
        return row

    @staticmethod
    def _require(row: RolloutRow, states: tuple[str, ...], action: str) -> None:
        if row.state not in states:
            raise Conflict(f"cannot {action} rollout {row.id}: it is {row.state} (needs {' or '.join(states)})")


def _event(row: RolloutRow, kind: str, wave: int | None, detail: str) -> None:
    now = utcnow()
    events = [*(row.events or []), {"at": _iso(now), "kind": kind, "wave": wave, "detail": detail}]
    row.events = events[-_MAX_EVENTS:]
    row.updated_at = now


def _cumulative_sizes(waves: list[dict[str, Any]]) -> list[int]:
    total, out = 0, []
    for w in waves:
        total += int(w["devices"])
        out.append(total)
    return out


def _stable(salt: str, device_id: str) -> str:
    return hashlib.sha256(f"{salt}/{device_id}".encode()).hexdigest()


def _iso(dt: datetime) -> str:
    return dt.isoformat()

