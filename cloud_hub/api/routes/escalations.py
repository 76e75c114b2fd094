"""Escalation statistics per device, region and model version; the raw-payload storage switch."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query, Response

from cloud_hub.api.deps import AdminDep, RowId, ServicesDep, error_responses
from cloud_hub.errors import InvalidInput
from cloud_hub.services import HubServices
from shared.api_schemas import (
    EscalationGroupBy,
    EscalationPayloadsPublic,
    EscalationStatsPublic,
    PayloadStoragePublic,
    PayloadStorageUpdate,
)

router = APIRouter(
    prefix="/api/v1/escalations", tags=["escalations"], responses=error_responses(400, 401, 403, 404, 422)
)

Limit = Annotated[int, Query(ge=1, le=1000, description="At most this many items.")]
Offset = Annotated[int, Query(ge=0, le=2**31 - 1, description="Skip this many items.")]


@router.get("/stats", response_model=EscalationStatsPublic)
def escalation_stats(
    services: ServicesDep,
    _: AdminDep,
    group_by: Annotated[EscalationGroupBy, Query(description="device, region or model_version")] = "device",
    since: Annotated[
        datetime | None, Query(description="From this time (ISO 8601; minute granularity).")
    ] = None,
    until: Annotated[datetime | None, Query(description="Before this time (ISO 8601).")] = None,
    device_id: Annotated[str | None, Query(description="Only this device.")] = None,
    region: Annotated[str | None, Query(description="Only this region.")] = None,
    model_name: Annotated[str | None, Query(description="Only this edge model.")] = None,
    model_version: Annotated[str | None, Query(description="Only this edge model version.")] = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> EscalationStatsPublic:
    """Escalations the hub handled (answered and errors, mean latency from receipt to answer), summed per
    device, region or edge model version. Counts reach the database within about a second."""
    since, until = _utc(since), _utc(until)
    data, count = services.escalations.stats(
        group_by,
        since=since,
        until=until,
        device_id=device_id,
        region=region,
        model_name=model_name,
        model_version=model_version,
        limit=limit,
        offset=offset,
    )
    return EscalationStatsPublic(group_by=group_by, since=since, until=until, data=data, count=count)


@router.get("/payload-storage", response_model=PayloadStoragePublic)
def get_payload_storage(services: ServicesDep, _: AdminDep) -> PayloadStoragePublic:
    """Whether raw escalation payloads are stored (off unless an admin turned it on), and the limits."""
    return _storage(services)


@router.put("/payload-storage", response_model=PayloadStoragePublic)
def set_payload_storage(body: PayloadStorageUpdate, services: ServicesDep, _: AdminDep) -> PayloadStoragePublic:
    """Turn raw payload storage on or off for every hub on this database (within a second); limits not
    given keep their values. Turning it off stores nothing new; stored payloads age out or are purged."""
    policy = services.escalations.set_policy(body.enabled, body.retention_s, body.max_rows)
    services.activity.apply_policy(policy)
    return _storage(services)


@router.get("/payloads", response_model=EscalationPayloadsPublic)
def list_payloads(
    services: ServicesDep,
    _: AdminDep,
    device_id: Annotated[str | None, Query(description="Only this device's payloads.")] = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> EscalationPayloadsPublic:
    """Stored payloads' metadata, newest first."""
    data, count = services.escalations.list_payloads(device_id=device_id, limit=limit, offset=offset)
    return EscalationPayloadsPublic(data=data, count=count)


@router.get(
    "/payloads/{payload_id}",
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}, "description": "The payload as received"}},
)
def get_payload(payload_id: RowId, services: ServicesDep, _: AdminDep) -> Response:
    """One stored payload, byte for byte as the device sent it (a ``shared.codec`` frame)."""
    return Response(services.escalations.payload(payload_id), media_type="application/octet-stream")


@router.delete("/payloads", response_model=PayloadStoragePublic)
def purge_payloads(services: ServicesDep, _: AdminDep) -> PayloadStoragePublic:
    """Delete every stored payload now."""
    services.escalations.purge_payloads()
    return _storage(services)


def _storage(services: HubServices) -> PayloadStoragePublic:
    policy = services.escalations.policy()
    return PayloadStoragePublic(
        enabled=policy.enabled,
        retention_s=policy.retention_s,
        max_rows=policy.max_rows,
        stored=services.escalations.count_payloads(),
    )


def _utc(value: datetime | None) -> datetime | None:
    # A time without a zone is read as UTC, like every time the hub stores.
    if value is None:
        return None
    try:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except (OverflowError, ValueError):
        raise InvalidInput(f"time {value.isoformat()} is out of range") from None
