"""ORM rows for federation runs and schedules.

Schema owned by migration ``0003_federation``; see cloud_hub/db/models.py for Base and UTCDateTime."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from cloud_hub.db.models import Base, UTCDateTime, utcnow

__all__ = ["FederationRunRow", "FederationScheduleRow"]


class FederationScheduleRow(Base):
    """A cron schedule that starts a federation run from ``spec`` (a round request) when it fires."""

    __tablename__ = "federation_schedules"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_name: Mapped[str] = mapped_column(String(128), index=True)
    cron: Mapped[str] = mapped_column(String(128))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    next_fire_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    last_fired_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    last_run_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # Why the last firing started no run (an overlapping run, a model without versions), else "".
    last_error: Mapped[str] = mapped_column(Text, default="")
    # Handed to the rollout controller when a run of this schedule passes the gate; None = no rollout.
    rollout_plan: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)


class FederationRunRow(Base):
    """One federation run: what was asked, what Flower reported round by round, and what it produced."""

    __tablename__ = "federation_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_name: Mapped[str] = mapped_column(String(128), index=True)
    kind: Mapped[str] = mapped_column(String(8))
    parent_version: Mapped[str] = mapped_column(String(64))
    strategy: Mapped[str] = mapped_column(String(32))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), index=True)  # queued | running | finished | failed
    stage: Mapped[str] = mapped_column(String(32), default="")  # where a run is inside its status
    reason: Mapped[str] = mapped_column(Text, default="")
    result: Mapped[str] = mapped_column(String(32), default="")  # registered | rejected by gate | ""
    flower_run_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    regions: Mapped[list[str]] = mapped_column(JSON, default=list)
    rounds: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    initial_metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    final_metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    privacy: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    gate: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    result_versions: Mapped[list[str]] = mapped_column(JSON, default=list)
    rollout_plan: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    rollout: Mapped[str] = mapped_column(Text, default="")  # what happened with the requested rollout
    schedule_id: Mapped[int | None] = mapped_column(
        ForeignKey("federation_schedules.id", ondelete="SET NULL"), nullable=True, index=True
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)
