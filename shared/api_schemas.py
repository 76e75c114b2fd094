"""REST request/response schemas shared by the hub's routes and ``shared.hub_client``.

Families follow one pattern per resource: ``XCreate`` (input), ``XPublic`` (output),
``XsPublic{data, count}`` (lists).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ModelKind",
    "ModelVersionPublic",
    "ModelVersionsPublic",
    "ModelPublic",
    "ModelsPublic",
    "DeviceCreate",
    "DeviceCreated",
    "DevicePublic",
    "DevicesPublic",
    "AssignmentPublic",
    "RunningReport",
    "SigningKeysPublic",
    "ErrorPublic",
    "LineagePublic",
    "TokenRole",
    "TokenCreate",
    "TokenCreated",
    "TokenPublic",
    "TokensPublic",
    "EscalationGroupBy",
    "EscalationStatPublic",
    "EscalationStatsPublic",
    "PayloadStoragePublic",
    "PayloadStorageUpdate",
    "EscalationPayloadPublic",
    "EscalationPayloadsPublic",
]

ModelKind = Literal["edge", "cloud"]


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid", from_attributes=True)


class ModelVersionPublic(_Schema):
    name: str
    version: str
    kind: ModelKind
    task: str
    parent_version: str | None = None
    sha256: str
    size_bytes: int
    metrics: dict[str, Any] = Field(default_factory=dict)
    manifest: dict[str, Any] | None = None
    lineage: dict[str, Any] | None = Field(
        default=None,
        description="How the version was made: federation_run_id, round, strategy, regions, parent_model, ...",
    )
    created_at: datetime


class ModelVersionsPublic(_Schema):
    data: list[ModelVersionPublic]
    count: int


class ModelPublic(_Schema):
    name: str
    kind: ModelKind
    task: str
    latest_version: str | None = None
    version_count: int


class ModelsPublic(_Schema):
    data: list[ModelPublic]
    count: int


class DeviceCreate(_Schema):
    device_id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    region: str = Field(default="", max_length=128)
    model_name: str | None = Field(
        default=None, description="Model this device runs; defaults to the hub's default edge model"
    )


class DeviceCreated(_Schema):
    device_id: str
    region: str
    token: str = Field(description="Device token; shown once, stored hashed")


class DevicePublic(_Schema):
    device_id: str
    region: str
    model_name: str | None = None
    assigned_version: str | None = None
    running_version: str | None = None
    online: bool = False
    last_seen: datetime | None = None
    registered_at: datetime
    escalations: int = 0


class DevicesPublic(_Schema):
    data: list[DevicePublic]
    count: int


class AssignmentPublic(_Schema):
    device_id: str
    model_name: str
    version: str
    sha256: str


class RunningReport(_Schema):
    model_name: str = Field(min_length=1, max_length=128)
    version: str = Field(min_length=1, max_length=64)


class SigningKeysPublic(_Schema):
    keys: list[str] = Field(description="PEM-encoded Ed25519 public keys trusted for bundles")


class ErrorPublic(_Schema):
    detail: str


class LineagePublic(_Schema):
    """A version and its ancestors, newest first; ``missing_parent`` names a parent that is not registered."""

    data: list[ModelVersionPublic]
    count: int
    missing_parent: str | None = None


TokenRole = Literal["admin", "device"]


class TokenCreate(_Schema):
    name: str = Field(min_length=1, max_length=128, description="What the token is for (shown in lists)")
    role: TokenRole
    device_id: str | None = Field(default=None, max_length=128, description="The device of a device token")
    replace: bool = Field(default=False, description="Device tokens: revoke the device's other live tokens")


class TokenPublic(_Schema):
    id: int
    name: str
    role: TokenRole
    device_id: str | None = None
    created_at: datetime
    last_used_at: datetime | None = None
    revoked_at: datetime | None = None


class TokenCreated(TokenPublic):
    token: str = Field(description="The bearer token; shown once, stored hashed")


class TokensPublic(_Schema):
    data: list[TokenPublic]
    count: int


EscalationGroupBy = Literal["device", "region", "model_version"]


class EscalationStatPublic(_Schema):
    """One group's escalations; the key fields not grouped by are None."""

    device_id: str | None = None
    region: str | None = None
    model_name: str | None = None
    model_version: str | None = None
    escalations: int
    answered: int
    errors: int
    error_rate: float
    mean_latency_ms: float | None = Field(description="Receipt at the hub to answer sent, over answered ones")
    first_minute: datetime
    last_minute: datetime


class EscalationStatsPublic(_Schema):
    group_by: EscalationGroupBy
    since: datetime | None = None
    until: datetime | None = None
    data: list[EscalationStatPublic]
    count: int


class PayloadStorageUpdate(_Schema):
    enabled: bool
    retention_s: float | None = Field(default=None, gt=0, description="Keep stored payloads this long")
    max_rows: int | None = Field(default=None, ge=1, description="Keep at most this many payloads")


class PayloadStoragePublic(_Schema):
    enabled: bool
    retention_s: float
    max_rows: int
    stored: int = Field(description="Payloads stored now")


class EscalationPayloadPublic(_Schema):
    id: int
    received_at: datetime
    request_id: str
    device_id: str
    region: str
    task: str
    model_name: str
    model_version: str
    cloud_label: int | None = None
    cloud_confidence: float | None = None
    size_bytes: int


class EscalationPayloadsPublic(_Schema):
    data: list[EscalationPayloadPublic]
    count: int
