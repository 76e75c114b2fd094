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
