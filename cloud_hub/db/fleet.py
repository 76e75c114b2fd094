"""ORM rows for the fleet: API tokens, escalation statistics, stored payloads and runtime hub settings.

Schema owned by migration 0002; see cloud_hub/db/models.py for Base and UTCDateTime."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Float, Index, Integer, LargeBinary, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from cloud_hub.db.models import Base, UTCDateTime, utcnow

__all__ = ["ApiTokenRow", "EscalationStatRow", "EscalationPayloadRow", "HubSettingRow"]


class ApiTokenRow(Base):
    """An admin or device bearer token; only its SHA-256 is stored. Revoked tokens stay listed."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    role: Mapped[str] = mapped_column(String(16))  # "admin" or "device"
    device_id: Mapped[str | None] = mapped_column(String(128), nullable=True, index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class EscalationStatRow(Base):
    """Escalations the hub handled in one minute for one device and edge model version.

    ``answered`` + ``errors`` = escalations; ``latency_ms_sum`` covers the answered ones (receipt at the
    hub to answer published, model time included)."""

    __tablename__ = "escalation_stats"
    __table_args__ = (
        UniqueConstraint(
            "bucket", "device_id", "region", "model_name", "model_version", name="uq_escalation_stats_key"
        ),
        Index("ix_escalation_stats_bucket", "bucket"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    bucket: Mapped[datetime] = mapped_column(UTCDateTime())  # start of the minute, UTC
    device_id: Mapped[str] = mapped_column(String(128))
    region: Mapped[str] = mapped_column(String(128))
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(128))
    answered: Mapped[int] = mapped_column(Integer)
    errors: Mapped[int] = mapped_column(Integer)
    latency_ms_sum: Mapped[float] = mapped_column(Float)


class EscalationPayloadRow(Base):
    """A raw escalation payload with the cloud's answer; stored only while an admin enables it."""

    __tablename__ = "escalation_payloads"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    request_id: Mapped[str] = mapped_column(String(128))
    device_id: Mapped[str] = mapped_column(String(128), index=True)
    region: Mapped[str] = mapped_column(String(128))
    task: Mapped[str] = mapped_column(String(128))
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(128))
    cloud_label: Mapped[int | None] = mapped_column(Integer, nullable=True)
    cloud_confidence: Mapped[float | None] = mapped_column(Float, nullable=True)
    size_bytes: Mapped[int] = mapped_column(Integer)
    payload: Mapped[bytes] = mapped_column(LargeBinary)


class HubSettingRow(Base):
    """A setting an admin changed at run time (shared by every hub worker on this database)."""

    __tablename__ = "hub_settings"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[dict[str, Any]] = mapped_column(JSON)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)
