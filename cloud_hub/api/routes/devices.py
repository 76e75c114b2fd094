"""The fleet: register devices, read their state and assignment, record what they run."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from cloud_hub.api.deps import AdminDep, PrincipalDep, ServicesDep, ensure_device_or_admin, error_responses
from cloud_hub.errors import Forbidden
from shared.api_schemas import (
    AssignmentPublic,
    DeviceCreate,
    DeviceCreated,
    DevicePublic,
    DevicesPublic,
    RunningReport,
)

router = APIRouter(
    prefix="/api/v1/devices", tags=["devices"], responses=error_responses(400, 401, 403, 404, 409, 422)
)


@router.post("", status_code=201, response_model=DeviceCreated)
def register_device(body: DeviceCreate, services: ServicesDep, _: AdminDep) -> DeviceCreated:
    """Register a device; the answer holds its token, which the hub shows only this once."""
    info, token = services.devices.register(body.device_id, body.region, body.model_name)
    return DeviceCreated(device_id=info.device_id, region=info.region, token=token)


@router.get("", response_model=DevicesPublic)
def list_devices(
    services: ServicesDep,
    _: AdminDep,
    region: Annotated[str | None, Query(description="Only devices of this region.")] = None,
    online: Annotated[bool | None, Query(description="Only online (true) or offline (false) devices.")] = None,
    model: Annotated[str | None, Query(description="Only devices running this edge model.")] = None,
    running_version: Annotated[str | None, Query(description="Only devices reporting this version.")] = None,
    assigned_version: Annotated[str | None, Query(description="Only devices pinned to this version.")] = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="At most this many items.")] = 100,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1, description="Skip this many items.")] = 0,
) -> DevicesPublic:
    """The fleet by device id: region, online state (from the retained status and Last Will), last seen,
    assigned and running version, escalations answered; ``count`` is the total matching the filters."""
    devices, count = services.devices.list(
        limit,
        offset,
        region=region,
        online=online,
        model_name=model,
        running_version=running_version,
        assigned_version=assigned_version,
    )
    return DevicesPublic(data=devices, count=count)


@router.get("/{device_id}", response_model=DevicePublic)
def get_device(device_id: str, services: ServicesDep, principal: PrincipalDep) -> DevicePublic:
    ensure_device_or_admin(principal, device_id)
    return services.devices.get(device_id)


@router.get("/{device_id}/assignment", response_model=AssignmentPublic)
def get_assignment(device_id: str, services: ServicesDep, principal: PrincipalDep) -> AssignmentPublic:
    """The version this device must run: its pinned version, else the newest of its model."""
    ensure_device_or_admin(principal, device_id)
    info = services.devices.assignment(device_id)
    return AssignmentPublic(
        device_id=device_id, model_name=info.name, version=info.version, sha256=info.sha256
    )


@router.put("/{device_id}/running", status_code=204)
def report_running(
    device_id: str, body: RunningReport, services: ServicesDep, principal: PrincipalDep
) -> None:
    """A device reports the version it now serves."""
    if principal.device_id != device_id:
        raise Forbidden(f"only device {device_id} itself may report what it runs")
    services.devices.report_running(device_id, body.model_name, body.version)
