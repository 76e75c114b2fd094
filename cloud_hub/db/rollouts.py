"""ORM rows for rollouts, their per-device targets, and the device health samples that gate them.

Schema owned by migration 0004; see cloud_hub/db/models.py for Base and UTCDateTime.
JSON columns are always replaced as a whole (never mutated in place) so SQLAlchemy sees the change.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Float, ForeignKey, Index, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from cloud_hub.db.models import Base, UTCDateTime, utcnow

__all__ = ["RolloutRow", "RolloutDeviceRow", "DeviceHealthRow"]


class RolloutRow(Base):
    """One rollout: its plan, where it stands (state, wave, window start) and what was decided."""

    __tablename__ = "rollouts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_name: Mapped[str] = mapped_column(String(128))
    version: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(24), index=True)
    plan: Mapped[dict[str, Any]] = mapped_column(JSON)
    current_wave: Mapped[int] = mapped_column(Integer, default=0)
    wave_started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    waves: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    events: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    baseline: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    failure: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class RolloutDeviceRow(Base):
    """A device in a rollout's target: its place in the order, its wave once assigned, what it ran before."""

    __tablename__ = "rollout_devices"
    __table_args__ = (UniqueConstraint("rollout_id", "device_id", name="uq_rollout_devices_rollout_device"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    rollout_id: Mapped[int] = mapped_column(ForeignKey("rollouts.id", ondelete="CASCADE"), index=True)
    device_id: Mapped[str] = mapped_column(String(128))
    position: Mapped[int] = mapped_column(Integer)
    wave: Mapped[int | None] = mapped_column(Integer, nullable=True)
    previous_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    assigned_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class DeviceHealthRow(Base):
    """One telemetry sample: the served version's counters since it started serving on the device.

    ``received_at`` and ``model_started_at`` are on the hub's clock; ``model_since`` is the agent's
    own timestamp, used only to tell one serving period of a version from the next.
    """

    __tablename__ = "device_health"
    __table_args__ = (Index("ix_device_health_device_id", "device_id", "received_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_id: Mapped[str] = mapped_column(String(128))
    received_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(64))
    model_since: Mapped[float] = mapped_column(Float)
    model_started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    requests: Mapped[int] = mapped_column(Integer)
    errors: Mapped[int] = mapped_column(Integer)
    escalated: Mapped[int] = mapped_column(Integer)
    cloud_answers: Mapped[int] = mapped_column(Integer)
    agreed: Mapped[int] = mapped_column(Integer)
    local_p99_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    update_error: Mapped[str] = mapped_column(String(500), default="")
