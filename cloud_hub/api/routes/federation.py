"""Federation rounds (runs) and schedules; every call needs the admin token."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool

from cloud_hub.api.deps import AdminDep, ServicesDep, read_body
from cloud_hub.errors import InvalidInput
from cloud_hub.federation.sources import store_source
from shared.federation_api import (
    RUN_STATUSES,
    FedRoundCreate,
    FedRunPublic,
    FedRunsPublic,
    FedScheduleCreate,
    FedSchedulePublic,
    FedSchedulesPublic,
    FedScheduleUpdate,
)

router = APIRouter(prefix="/api/v1/federation", tags=["federation"])

Limit = Annotated[int, Query(ge=1, le=1000, description="At most this many items.")]
Offset = Annotated[int, Query(ge=0, le=2**31 - 1, description="Skip this many items.")]
RunId = Annotated[int, Path(ge=1, le=2**31 - 1, description="The hub's id of the federation run.")]
ScheduleId = Annotated[int, Path(ge=1, le=2**31 - 1, description="The schedule's id.")]


# --- rounds ---------------------------------------------------------------------------------------
@router.post("/rounds", status_code=202, response_model=FedRunPublic)
def start_round(body: FedRoundCreate, services: ServicesDep, _: AdminDep) -> FedRunPublic:
    """Run a federation now from the model's current (or the given) version. Answers at once with the
    queued run; 409 names the run when the model already has one queued or running."""
    return services.federation.submit(body)


@router.get("/rounds", response_model=FedRunsPublic)
def list_rounds(
    services: ServicesDep,
    _: AdminDep,
    model: Annotated[str | None, Query(description="Only runs of this model.")] = None,
    status: Annotated[str | None, Query(description=f"Only runs in this status: {', '.join(RUN_STATUSES)}.")] = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> FedRunsPublic:
    """Federation runs, newest first, with their state, reason, per-round metrics and results."""
    if status is not None and status not in RUN_STATUSES:
        raise InvalidInput(f"unknown status {status!r}; use one of {', '.join(RUN_STATUSES)}")
    runs, count = services.federation.list(model_name=model, status=status, limit=limit, offset=offset)
    return FedRunsPublic(data=runs, count=count)


@router.get("/rounds/{run_id}", response_model=FedRunPublic)
def get_round(run_id: RunId, services: ServicesDep, _: AdminDep) -> FedRunPublic:
    return services.federation.get(run_id)


@router.post("/rounds/{run_id}/cancel", response_model=FedRunPublic)
def cancel_round(run_id: RunId, services: ServicesDep, _: AdminDep) -> FedRunPublic:
    """Stop a queued or running run at the SuperLink; it is recorded as failed, cancelled by the admin."""
    return services.federation.cancel(run_id)


# --- schedules ------------------------------------------------------------------------------------
@router.post("/schedules", status_code=201, response_model=FedSchedulePublic)
def create_schedule(body: FedScheduleCreate, services: ServicesDep, _: AdminDep) -> FedSchedulePublic:
    """Run ``round`` whenever ``cron`` fires (UTC); the template is checked now (model, version, strategy)."""
    return services.fed_schedules.create(body)


@router.get("/schedules", response_model=FedSchedulesPublic)
def list_schedules(services: ServicesDep, _: AdminDep, limit: Limit = 100, offset: Offset = 0) -> FedSchedulesPublic:
    schedules, count = services.fed_schedules.list(limit, offset)
    return FedSchedulesPublic(data=schedules, count=count)


@router.get("/schedules/{schedule_id}", response_model=FedSchedulePublic)
def get_schedule(schedule_id: ScheduleId, services: ServicesDep, _: AdminDep) -> FedSchedulePublic:
    return services.fed_schedules.get(schedule_id)


@router.patch("/schedules/{schedule_id}", response_model=FedSchedulePublic)
def update_schedule(
    schedule_id: ScheduleId, body: FedScheduleUpdate, services: ServicesDep, _: AdminDep
) -> FedSchedulePublic:
    """Enable (the next fire time is computed from now) or disable a schedule."""
    return services.fed_schedules.set_enabled(schedule_id, body.enabled)


@router.delete("/schedules/{schedule_id}", status_code=204, response_class=Response)
def delete_schedule(schedule_id: ScheduleId, services: ServicesDep, _: AdminDep) -> Response:
    """Remove a schedule; the runs it started keep their records."""
    services.fed_schedules.delete(schedule_id)
    return Response(status_code=204)


# --- source checkpoints of edge versions ----------------------------------------------------------
@router.put("/sources/{name}/{version}", status_code=204, response_class=Response)
async def put_source(name: str, version: str, request: Request, services: ServicesDep, _: AdminDep) -> Response:
    """Upload the PyTorch checkpoint an edge version was compressed from, so federation can train it.
    Refused unless it matches the bundle (task, labels, input shape, and the signed hash when present)."""
    data = await read_body(request, services.settings.max_upload_bytes)
    info = await run_in_threadpool(services.registry.get_version, name, version)
    await run_in_threadpool(store_source, services.registry, info, data)
    return Response(status_code=204)
