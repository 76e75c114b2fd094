"""Rollouts: start a plan (canary, waves, gates), follow it, promote, pause, resume, roll back."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Body, Path, Query
from pydantic import BaseModel, ConfigDict, Field

from cloud_hub.api.deps import AdminDep, ServicesDep
from shared.rollouts import RolloutCreate, RolloutPublic, RolloutsPublic, RolloutState

router = APIRouter(prefix="/api/v1/rollouts", tags=["rollouts"])


class RolloutAction(BaseModel):
    """Why (kept in the rollout's events)."""

    model_config = ConfigDict(extra="forbid")
    reason: str = Field(default="", max_length=500)


Action = Literal["promote", "pause", "resume", "rollback"]
RolloutId = Annotated[int, Path(ge=1, le=2**31 - 1, description="The rollout's id")]


@router.post("", status_code=201, response_model=RolloutPublic)
def start_rollout(body: RolloutCreate, services: ServicesDep, _: AdminDep) -> RolloutPublic:
    """Start a rollout; the canary group gets the version at once. 409 if a target device is in another
    active rollout."""
    return services.rollouts.start(body)


@router.get("", response_model=RolloutsPublic)
def list_rollouts(
    services: ServicesDep,
    _: AdminDep,
    state: RolloutState | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
) -> RolloutsPublic:
    """Rollouts, newest first."""
    data, count = services.rollouts.list(state, limit, offset)
    return RolloutsPublic(data=data, count=count)


@router.get("/{rollout_id}", response_model=RolloutPublic)
def get_rollout(rollout_id: RolloutId, services: ServicesDep, _: AdminDep) -> RolloutPublic:
    """A rollout with its waves, gate values, decisions and each device's state."""
    return services.rollouts.get(rollout_id)


@router.post("/{rollout_id}/{action}", response_model=RolloutPublic)
def act(
    rollout_id: RolloutId,
    action: Action,
    services: ServicesDep,
    _: AdminDep,
    body: Annotated[RolloutAction | None, Body()] = None,
) -> RolloutPublic:
    """promote (next wave now), pause, resume (the window restarts) or rollback (every device that got
    the version returns to the exact version it ran before)."""
    reason = body.reason if body is not None else ""
    fn = {
        "promote": services.rollouts.promote,
        "pause": services.rollouts.pause,
        "resume": services.rollouts.resume,
        "rollback": services.rollouts.rollback,
    }[action]
    return fn(rollout_id, reason)
