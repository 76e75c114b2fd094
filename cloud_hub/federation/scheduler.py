"""Cron schedules of federation runs: stored in the database, fired by one thread with croniter.

Each schedule keeps its next fire time in its row, so a hub restart continues where it stopped: a
fire time that passed while the hub was down fires once at start (not once per missed slot), and the
next one is computed from then. A firing that cannot start a run (another run of the model is still
going, the model lost its versions) starts none and says why in ``last_error``. Cron expressions are
read in UTC. The clock is injectable, so tests fire a schedule without waiting for it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select

from cloud_hub.db.federation import FederationScheduleRow
from cloud_hub.db.models import utcnow
from cloud_hub.db.session import Database
from cloud_hub.errors import HubServiceError, InvalidInput, NotFound
from cloud_hub.federation.service import FederationService, check_rollout_plan
from shared.federation_api import FedRoundCreate, FedScheduleCreate, FedSchedulePublic

__all__ = ["FederationScheduler", "next_fire", "check_cron"]

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]


def check_cron(expr: str) -> str:
    """The expression, normalised; InvalidInput naming the problem if croniter cannot read it."""
    from croniter import croniter

    expr = " ".join(expr.split())
    if len(expr.split()) != 5:
        raise InvalidInput(
            f"cron expression {expr!r} has {len(expr.split())} fields; use five: minute hour day month weekday "
            "(e.g. '0 3 * * *' for 03:00 UTC every day)",
            kind="bad_cron",
        )
    if not croniter.is_valid(expr):
        raise InvalidInput(f"cron expression {expr!r} is not valid (minute hour day month weekday)", kind="bad_cron")
    return expr


def next_fire(expr: str, after: datetime) -> datetime:
    """The first time strictly after ``after`` (UTC) that ``expr`` matches."""
    from croniter import croniter

    return croniter(expr, after.astimezone(UTC)).get_next(datetime).astimezone(UTC)  # type: ignore[no-any-return]


class FederationScheduler:
    """Schedules CRUD plus a thread that fires due schedules through ``FederationService.submit``."""

    def __init__(
        self, db: Database, runs: FederationService, *, clock: Clock = utcnow, max_sleep_s: float = 30.0
    ) -> None:
        self._db = db
        self._runs = runs
        self._clock = clock
        self._max_sleep_s = max_sleep_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="fed-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    # --- schedules -------------------------------------------------------------------------
    def create(self, request: FedScheduleCreate) -> FedSchedulePublic:
        """Validate the cron expression and the round template now (model, version, strategy), then store."""
        cron = check_cron(request.cron)
        info, _ = self._runs.validate(request.round)
        if request.rollout_plan is not None:
            check_rollout_plan(request.rollout_plan, info)
        now = self._clock()
        with self._db.session() as s:
            row = FederationScheduleRow(
                model_name=request.round.model_name,
                cron=cron,
                spec=request.round.model_dump(mode="json"),
                enabled=request.enabled,
                next_fire_at=next_fire(cron, now) if request.enabled else None,
                last_error="",
                rollout_plan=request.rollout_plan,
            )
            s.add(row)
            s.flush()
            public = _public(row)
        self._wake.set()
        return public

    def get(self, schedule_id: int) -> FedSchedulePublic:
        with self._db.session() as s:
            return _public(self._row(s, schedule_id))

    def list(self, limit: int = 100, offset: int = 0) -> tuple[list[FedSchedulePublic], int]:
        with self._db.session() as s:
            total = s.scalar(select(func.count()).select_from(FederationScheduleRow)) or 0
            rows = s.scalars(
                select(FederationScheduleRow).order_by(FederationScheduleRow.id).limit(limit).offset(offset)
            ).all()
            return [_public(r) for r in rows], total

    def set_enabled(self, schedule_id: int, enabled: bool) -> FedSchedulePublic:
        """Enable (next fire time from now) or disable (no fire time) a schedule."""
        with self._db.session() as s:
            row = self._row(s, schedule_id)
            row.enabled = enabled
            row.next_fire_at = next_fire(row.cron, self._clock()) if enabled else None
            s.flush()
            public = _public(row)
        self._wake.set()
        return public

    def delete(self, schedule_id: int) -> None:
        """Remove a schedule; runs it started keep their record (their schedule id becomes empty)."""
        with self._db.session() as s:
            s.delete(self._row(s, schedule_id))

    # --- firing ----------------------------------------------------------------------------
    def tick(self, now: datetime | None = None) -> list[int]:
        """Fire every enabled schedule due at ``now``; return the ids of the runs started."""
        now = now or self._clock()
        with self._db.session() as s:
            due = s.scalars(
                select(FederationScheduleRow)
                .where(FederationScheduleRow.enabled.is_(True), FederationScheduleRow.next_fire_at <= now)
                .order_by(FederationScheduleRow.id)
            ).all()
            jobs = [(r.id, dict(r.spec), r.rollout_plan, r.cron) for r in due]
        started: list[int] = []
        for schedule_id, spec, plan, cron in jobs:
            run_id, error = self._fire(schedule_id, spec, plan)
            with self._db.session() as s:
                row = s.get(FederationScheduleRow, schedule_id)
                if row is None:  # deleted meanwhile
                    continue
                row.last_fired_at = now
                row.next_fire_at = next_fire(cron, now)
                row.last_error = error
                if run_id is not None:
                    row.last_run_id = run_id
            if run_id is not None:
                started.append(run_id)
        return started

    def _fire(self, schedule_id: int, spec: dict[str, Any], plan: dict[str, Any] | None) -> tuple[int | None, str]:
        try:
            run = self._runs.submit(
                FedRoundCreate.model_validate(spec), schedule_id=schedule_id, rollout_plan=plan
            )
        except HubServiceError as exc:
            log.warning("schedule %d fired but started no run: %s", schedule_id, exc)
            return None, f"fired but started no run: {exc}"
        log.info("schedule %d started federation run %d", schedule_id, run.id)
        return run.id, ""

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # a database hiccup must not end the scheduling thread
                log.exception("federation scheduler tick failed; retrying")
            self._wake.clear()
            self._wake.wait(self._sleep_s())

    def _sleep_s(self) -> float:
        try:
            with self._db.session() as s:
                soonest = s.scalar(
                    select(FederationScheduleRow.next_fire_at)
                    .where(FederationScheduleRow.enabled.is_(True), FederationScheduleRow.next_fire_at.is_not(None))
                    .order_by(FederationScheduleRow.next_fire_at)
                    .limit(1)
                )
        except Exception:  # the next tick reports database errors
            return self._max_sleep_s
        if soonest is None:
            return self._max_sleep_s
        return min(self._max_sleep_s, max(0.05, (soonest - self._clock()).total_seconds()))

    @staticmethod
    def _row(s: Any, schedule_id: int) -> FederationScheduleRow:
        row = s.get(FederationScheduleRow, schedule_id)
        if row is None:
            raise NotFound(f"no federation schedule {schedule_id}")
        return row  # type: ignore[no-any-return]


def _public(row: FederationScheduleRow) -> FedSchedulePublic:
    return FedSchedulePublic.model_validate(row, from_attributes=True)
