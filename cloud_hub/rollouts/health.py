"""Device health from agent telemetry: buffered samples, windowed aggregates, load errors.

paho's network thread only appends a sample to a bounded buffer (``record``); ``flush`` writes the
buffer in one transaction (the rollout controller calls it on every tick). Telemetry counters are
cumulative since the served version started on the device, so the health of a window is the last
sample in it minus the last sample before it, per (device, version, serving period).
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, or_, select, update

from cloud_hub.db.models import DeviceRow, utcnow
from cloud_hub.db.rollouts import DeviceHealthRow
from cloud_hub.db.session import Database
from cloud_hub.rollouts.gates import Aggregate
from shared.messages import Telemetry

__all__ = ["HealthRecorder"]

log = logging.getLogger(__name__)

_CHUNK = 500  # device ids per IN (...) query
_COUNTERS = ("requests", "errors", "escalated", "cloud_answers", "agreed")
_COLUMNS = ("device_id", "received_at", "model_version", "model_since", "model_started_at", *_COUNTERS,
            "local_p99_ms")


@dataclass(frozen=True)
class _Zero:
    requests: int = 0
    errors: int = 0
    escalated: int = 0
    cloud_answers: int = 0
    agreed: int = 0


class HealthRecorder:
    """Telemetry samples in, per-window aggregates out."""

    def __init__(self, db: Database, *, retention_s: float = 86400.0, max_buffer: int = 100_000) -> None:
        self._db = db
        self.retention_s = retention_s
        self._max_buffer = max_buffer
        self._lock = threading.Lock()
        self._buffer: list[DeviceHealthRow] = []
        self.dropped = 0

    def record(self, device_id: str, tel: Telemetry) -> None:
        """paho thread: keep one sample (telemetry without ``current_model`` is from an older agent)."""
        cm = tel.current_model
        if cm is None or not tel.model_version:
            return
        now = utcnow()
        age = max(0.0, tel.at - cm.since)  # both on the agent's clock, so skew cancels out
        row = DeviceHealthRow(
            device_id=device_id,
            received_at=now,
            model_name=tel.model_name,
            model_version=cm.version or tel.model_version,
            model_since=cm.since,
            model_started_at=now - timedelta(seconds=age),
            requests=cm.requests,
            errors=cm.errors,
            escalated=cm.escalated,
            cloud_answers=cm.cloud_answers,
            agreed=cm.agreed,
            local_p99_ms=cm.local_p99_ms,
            update_error=tel.update_error[:500],
        )
        with self._lock:
            if len(self._buffer) >= self._max_buffer:
                self._buffer.pop(0)
                self.dropped += 1
            self._buffer.append(row)

    def flush(self) -> int:
        """Write buffered samples of registered devices, and the version each now runs; on a database
        error the samples are kept for the next try."""
        with self._lock:
            rows, self._buffer = self._buffer, []
        if not rows:
            return 0
        try:
            with self._db.session() as s:
                known = set(s.scalars(select(DeviceRow.device_id).where(
                    DeviceRow.device_id.in_({r.device_id for r in rows}))))
                keep = [r for r in rows if r.device_id in known]
                s.add_all(keep)
                # Telemetry also says what each device runs: this repairs a missed REST report.
                newest = {r.device_id: r for r in keep}
                for r in newest.values():
                    s.execute(
                        update(DeviceRow)
                        .where(DeviceRow.device_id == r.device_id, DeviceRow.model_name == r.model_name,
                               or_(DeviceRow.running_version.is_(None), DeviceRow.running_version != r.model_version))
                        .values(running_version=r.model_version)
                    )
            return len(keep)
        except Exception:  # the database may be briefly locked: keep the samples, retry next tick
            log.warning("could not write %d health sample(s); retrying", len(rows), exc_info=True)
            with self._lock:
                self._buffer[:0] = [_copy(r) for r in rows]
            return 0

    def prune(self) -> int:
        """Delete samples older than the retention."""
        cutoff = utcnow() - timedelta(seconds=self.retention_s)
        with self._db.session() as s:
            return s.execute(delete(DeviceHealthRow).where(DeviceHealthRow.received_at < cutoff)).rowcount or 0

    # --- reading ---------------------------------------------------------------------------------
    def aggregate(
        self,
        device_ids: Iterable[str],
        model_name: str,
        start: datetime,
        end: datetime,
        version_ok: Callable[[str], bool],
        lookback_s: float = 300.0,
    ) -> Aggregate:
        """Health of ``device_ids`` over [start, end], counting only versions for which ``version_ok``."""
        agg = Aggregate()
        by_device: dict[str, list[Any]] = defaultdict(list)
        for row in self._rows(device_ids, model_name, start - timedelta(seconds=lookback_s), end):
            by_device[row.device_id].append(row)
        for rows in by_device.values():
            contributed = False
            periods: dict[tuple[str, float], list[Any]] = defaultdict(list)
            for row in rows:
                periods[(row.model_version, row.model_since)].append(row)
            for (version, _), samples in periods.items():
                if not version_ok(version):
                    continue
                inside = [r for r in samples if r.received_at >= start]
                if not inside:
                    continue
                before = [r for r in samples if r.received_at < start]
                last = inside[-1]
                if before:
                    base: Any = before[-1]
                elif last.model_started_at >= start:
                    base = _Zero()  # the version started serving inside the window
                else:
                    base = inside[0]  # what happened before the first sample here is not known
                delta = {c: max(0, getattr(last, c) - getattr(base, c)) for c in _COUNTERS}
                agg.add(**delta, p99_ms=last.local_p99_ms)
                contributed = contributed or delta["requests"] > 0
            agg.devices += int(contributed)
        return agg

    def update_errors(self, assigned: dict[str, datetime], version: str, grace_s: float) -> dict[str, str]:
        """Devices whose newest sample, sent ``grace_s`` after their assignment, reports a refused update
        while they do not run ``version``."""
        if not assigned:
            return {}
        earliest = min(assigned.values()) + timedelta(seconds=grace_s)
        out = {}
        with self._db.session() as s:
            ids = sorted(assigned)
            for i in range(0, len(ids), _CHUNK):
                newest = (
                    select(func.max(DeviceHealthRow.id))
                    .where(DeviceHealthRow.device_id.in_(ids[i : i + _CHUNK]), DeviceHealthRow.received_at >= earliest)
                    .group_by(DeviceHealthRow.device_id)
                )
                rows = s.execute(
                    select(DeviceHealthRow.device_id, DeviceHealthRow.received_at, DeviceHealthRow.model_version,
                           DeviceHealthRow.update_error).where(DeviceHealthRow.id.in_(newest))
                ).all()
                for device_id, received_at, model_version, error in rows:
                    if received_at < assigned[device_id] + timedelta(seconds=grace_s):
                        continue
                    if error and model_version != version:
                        out[device_id] = error
        return out

    def count(self) -> int:
        with self._db.session() as s:
            return s.scalar(select(func.count()).select_from(DeviceHealthRow)) or 0

    def _rows(self, device_ids: Iterable[str], model_name: str, start: datetime, end: datetime) -> list[Any]:
        """Plain rows (no ORM objects: a window over a fleet is many samples), by device and time."""
        ids = sorted(set(device_ids))
        cols = [getattr(DeviceHealthRow, c) for c in _COLUMNS]
        out: list[Any] = []
        with self._db.session() as s:
            for i in range(0, len(ids), _CHUNK):
                q = (
                    select(*cols)
                    .where(
                        DeviceHealthRow.device_id.in_(ids[i : i + _CHUNK]),
                        DeviceHealthRow.received_at >= start,
                        DeviceHealthRow.received_at <= end,
                        DeviceHealthRow.model_name == model_name,
                    )
                    .order_by(DeviceHealthRow.device_id, DeviceHealthRow.received_at, DeviceHealthRow.id)
                )
                out += s.execute(q).all()
        return out


def _copy(row: DeviceHealthRow) -> DeviceHealthRow:
    cols = [c.key for c in DeviceHealthRow.__table__.columns if c.key != "id"]
    return DeviceHealthRow(**{k: getattr(row, k) for k in cols})

