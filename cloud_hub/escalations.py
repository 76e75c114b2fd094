"""Escalation statistics per device, region and edge model version, and the optional raw payload store.

The MQTT gateway's activity buffer (``cloud_hub.gateway.activity``) hands over per-minute counts once a
second; they are added into ``escalation_stats`` with one upsert per (minute, device, region, model,
version). Raw payloads are stored only while the payload-storage policy is enabled (off by default);
stored ones are pruned by age and count whether or not storing is on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import ColumnElement, delete, func, select
from sqlalchemy.orm import Session

from cloud_hub.db.fleet import EscalationPayloadRow, EscalationStatRow, HubSettingRow
from cloud_hub.db.models import DeviceRow, utcnow
from cloud_hub.db.session import Database
from cloud_hub.errors import InvalidInput, NotFound
from shared.api_schemas import EscalationGroupBy, EscalationPayloadPublic, EscalationStatPublic

__all__ = [
    "DEFAULT_PAYLOAD_POLICY",
    "EscalationStore",
    "PayloadPolicy",
    "PayloadRecord",
    "StatCounts",
    "StatKey",
    "minute_of",
]

POLICY_KEY = "payload_storage"
_KEY_COLUMNS = ("bucket", "device_id", "region", "model_name", "model_version")
_GROUPS: dict[str, tuple[str, ...]] = {
    "device": ("device_id",),
    "region": ("region",),
    "model_version": ("model_name", "model_version"),
}


def minute_of(at: datetime) -> datetime:
    """The start of ``at``'s minute: the granularity of escalation statistics."""
    return at.replace(second=0, microsecond=0)


class StatKey(NamedTuple):
    """What one ``escalation_stats`` row counts (a tuple: it is built once per escalation)."""

    bucket: datetime
    device_id: str
    region: str
    model_name: str
    model_version: str


@dataclass
class StatCounts:
    answered: int = 0
    errors: int = 0
    latency_ms_sum: float = 0.0

    def add(self, other: StatCounts) -> None:
        self.answered += other.answered
        self.errors += other.errors
        self.latency_ms_sum += other.latency_ms_sum


@dataclass(frozen=True)
class PayloadRecord:
    """One answered escalation's raw payload, as received, with the cloud's answer."""

    received_at: datetime
    request_id: str
    device_id: str
    region: str
    task: str
    model_name: str
    model_version: str
    cloud_label: int | None
    cloud_confidence: float | None
    payload: bytes


@dataclass(frozen=True)
class PayloadPolicy:
    enabled: bool
    retention_s: float
    max_rows: int

    def __post_init__(self) -> None:
        if not self.retention_s > 0:
            raise InvalidInput(f"payload retention must be > 0 seconds, got {self.retention_s}")
        if self.max_rows < 1:
            raise InvalidInput(f"payload max rows must be >= 1, got {self.max_rows}")


DEFAULT_PAYLOAD_POLICY = PayloadPolicy(enabled=False, retention_s=7 * 24 * 3600.0, max_rows=10_000)


class EscalationStore:
    """Statistics, payloads and the payload policy in the database; ``default_policy`` applies until an
    admin sets one (which is then kept in ``hub_settings`` and shared by every hub on the database)."""

    def __init__(
        self, db: Database, default_policy: PayloadPolicy, stats_retention_s: float = 30 * 24 * 3600.0
    ) -> None:
        self._db = db
        self.default_policy = default_policy
        self.stats_retention_s = stats_retention_s

    # --- writing (the activity flusher) ----------------------------------------------------
    def record(self, counts: dict[StatKey, StatCounts]) -> None:
        """Add per-minute counts. A key with an empty region takes the device's registered region."""
        if not counts:
            return
        with self._db.session() as s:
            regions = _registered_regions(s, {k.device_id for k in counts})
            merged: dict[StatKey, StatCounts] = {}
            for key, c in counts.items():
                region = regions.get(key.device_id) or key.region
                merged.setdefault(key._replace(region=region), StatCounts()).add(c)
            rows = [
                {**k._asdict(), **vars(c)} for k, c in merged.items()
            ]
            _upsert_stats(s, rows)

    def store_payloads(self, records: Sequence[PayloadRecord]) -> None:
        if not records:
            return
        with self._db.session() as s:
            s.add_all(EscalationPayloadRow(**vars(r), size_bytes=len(r.payload)) for r in records)

    def prune(self, policy: PayloadPolicy) -> int:
        """Delete payloads older than the retention or beyond the newest ``max_rows``, and statistics
        older than ``stats_retention_s``; return how many payloads went."""
        cutoff = utcnow() - timedelta(seconds=policy.retention_s)
        stats_cutoff = utcnow() - timedelta(seconds=self.stats_retention_s)
        with self._db.session() as s:
            s.execute(delete(EscalationStatRow).where(EscalationStatRow.bucket < stats_cutoff))
            gone = s.execute(delete(EscalationPayloadRow).where(EscalationPayloadRow.received_at < cutoff)).rowcount
            keep_from = s.scalar(
                select(EscalationPayloadRow.id)
                .order_by(EscalationPayloadRow.id.desc())
                .offset(policy.max_rows)
                .limit(1)
            )
            if keep_from is not None:
                gone += s.execute(delete(EscalationPayloadRow).where(EscalationPayloadRow.id <= keep_from)).rowcount
            return int(gone or 0)

    # --- the payload policy ----------------------------------------------------------------
    def policy(self) -> PayloadPolicy:
        with self._db.session() as s:
            row = s.get(HubSettingRow, POLICY_KEY)
            if row is None:
                return self.default_policy
            value = dict(row.value)
        return PayloadPolicy(bool(value["enabled"]), float(value["retention_s"]), int(value["max_rows"]))

    def set_policy(self, enabled: bool, retention_s: float | None, max_rows: int | None) -> PayloadPolicy:
        """Switch storing on or off; unset limits keep their current values."""
        current = self.policy()
        policy = PayloadPolicy(
            enabled,
            current.retention_s if retention_s is None else retention_s,
            current.max_rows if max_rows is None else max_rows,
        )
        value: dict[str, Any] = {
            "enabled": policy.enabled,
            "retention_s": policy.retention_s,
            "max_rows": policy.max_rows,
        }
        with self._db.session() as s:
            row = s.get(HubSettingRow, POLICY_KEY)
            if row is None:
                s.add(HubSettingRow(key=POLICY_KEY, value=value))
            else:
                row.value = value
                row.updated_at = utcnow()
        return policy

    # --- reading ---------------------------------------------------------------------------
    def stats(
        self,
        group_by: EscalationGroupBy,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        device_id: str | None = None,
        region: str | None = None,
        model_name: str | None = None,
        model_version: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> tuple[list[EscalationStatPublic], int]:
        """Sums per group over the minutes in [since, until), ordered by the group's key."""
        if group_by not in _GROUPS:
            raise InvalidInput(f"group_by must be one of {', '.join(_GROUPS)}, not {group_by!r}")
        if since is not None and until is not None and since >= until:
            raise InvalidInput(f"since ({since.isoformat()}) must be before until ({until.isoformat()})")
        t = EscalationStatRow
        conds: list[ColumnElement[bool]] = []
        if since is not None:
            conds.append(t.bucket >= minute_of(since))
        if until is not None:
            conds.append(t.bucket < until)
        for col, value in (
            (t.device_id, device_id),
            (t.region, region),
            (t.model_name, model_name),
            (t.model_version, model_version),
        ):
            if value is not None:
                conds.append(col == value)
        keys = [getattr(t, c) for c in _GROUPS[group_by]]
        grouped = select(
            *keys,
            func.sum(t.answered).label("answered"),
            func.sum(t.errors).label("errors"),
            func.sum(t.latency_ms_sum).label("latency"),
            func.min(t.bucket).label("first"),
            func.max(t.bucket).label("last"),
        ).where(*conds).group_by(*keys)
        with self._db.session() as s:
            total = s.scalar(select(func.count()).select_from(grouped.subquery())) or 0
            rows = s.execute(grouped.order_by(*keys).limit(limit).offset(offset)).all()
        out = []
        for r in rows:
            answered, errors = int(r.answered or 0), int(r.errors or 0)
            n = answered + errors
            out.append(
                EscalationStatPublic(
                    **{c: getattr(r, c) for c in _GROUPS[group_by]},
                    escalations=n,
                    answered=answered,
                    errors=errors,
                    error_rate=round(errors / n, 6) if n else 0.0,
                    mean_latency_ms=round(float(r.latency) / answered, 3) if answered else None,
                    first_minute=_aware(r.first),
                    last_minute=_aware(r.last),
                )
            )
        return out, total

    def list_payloads(
        self, *, device_id: str | None = None, limit: int = 100, offset: int = 0
    ) -> tuple[list[EscalationPayloadPublic], int]:
        """Stored payloads' metadata, newest first."""
        conds = [EscalationPayloadRow.device_id == device_id] if device_id is not None else []
        with self._db.session() as s:
            total = s.scalar(select(func.count()).select_from(EscalationPayloadRow).where(*conds)) or 0
            rows = s.scalars(
                select(EscalationPayloadRow)
                .where(*conds)
                .order_by(EscalationPayloadRow.id.desc())
                .limit(limit)
                .offset(offset)
            ).all()
            return [EscalationPayloadPublic.model_validate(r) for r in rows], total

    def payload(self, payload_id: int) -> bytes:
        with self._db.session() as s:
            data = s.scalar(select(EscalationPayloadRow.payload).where(EscalationPayloadRow.id == payload_id))
        if data is None:
            raise NotFound(f"no stored escalation payload with id {payload_id}")
        return bytes(data)

    def count_payloads(self) -> int:
        with self._db.session() as s:
            return s.scalar(select(func.count()).select_from(EscalationPayloadRow)) or 0

    def purge_payloads(self) -> int:
        with self._db.session() as s:
            return int(s.execute(delete(EscalationPayloadRow)).rowcount or 0)


def _registered_regions(s: Session, device_ids: set[str]) -> dict[str, str]:
    rows = s.execute(select(DeviceRow.device_id, DeviceRow.region).where(DeviceRow.device_id.in_(device_ids)))
    return {d: r for d, r in rows if r}


def _upsert_stats(s: Session, rows: list[dict[str, Any]]) -> None:
    """Add ``rows`` into escalation_stats: one INSERT ... ON CONFLICT DO UPDATE for SQLite and PostgreSQL."""
    dialect = s.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert  # type: ignore[assignment]
    else:
        raise RuntimeError(f"escalation statistics support SQLite and PostgreSQL, not {dialect}")
    t = EscalationStatRow
    stmt = insert(t)
    stmt = stmt.on_conflict_do_update(
        index_elements=list(_KEY_COLUMNS),
        set_={
            "answered": t.answered + stmt.excluded.answered,
            "errors": t.errors + stmt.excluded.errors,
            "latency_ms_sum": t.latency_ms_sum + stmt.excluded.latency_ms_sum,
        },
    )
    s.execute(stmt, rows)


def _aware(value: datetime) -> datetime:
    # Aggregates bypass the UTCDateTime column type: SQLite hands back naive UTC (or a string).
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value if value.tzinfo else value.replace(tzinfo=UTC)
