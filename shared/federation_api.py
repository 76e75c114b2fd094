"""REST schemas of ``/api/v1/federation``: round requests, run records and cron schedules.

Shared by the hub's federation routes and ``shared.hub_client``; pydantic only, so the CLI stays light.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, model_validator

__all__ = [
    "RUN_STATUSES",
    "SecAggSettings",
    "FedRoundCreate",
    "FedRunPublic",
    "FedRunsPublic",
    "FedScheduleCreate",
    "FedScheduleUpdate",
    "FedSchedulePublic",
    "FedSchedulesPublic",
]

RUN_STATUSES = ("queued", "running", "finished", "failed")


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid", from_attributes=True)


class SecAggSettings(_Schema):
    """SecAgg+ for a run (Flower's ``SecAggPlusWorkflow`` + ``secaggplus_mod``): the server sees only the sum.

    The numbers are Flower's own parameters; the rules below are the ones Flower's constructor
    enforces (and a few it would only warn about), so a bad value is refused before a run starts.
    """

    num_shares: StrictInt | StrictFloat = Field(
        3, description="Shares each region's secrets are split into: an integer >= 3, or a fraction in (0, 1] "
        "of the regions sampled in the round."
    )
    reconstruction_threshold: StrictInt | StrictFloat = Field(
        2, description="Shares needed to rebuild a dropped region's mask: an integer >= 2 and < num_shares, or "
        "a fraction in (0, 1] of num_shares."
    )
    clipping_range: float = Field(8.0, gt=0, le=1e6, description="Weights are clipped to +-clipping_range "
                                  "before quantisation.")
    quantization_range: StrictInt = Field(4194304, gt=1, description="Integer levels of the quantisation.")
    modulus_range: StrictInt = Field(4294967296, gt=1, le=4294967296,
                                     description="Mask modulus: a power of 2 > quantization_range, at most 2**32.")
    max_weight: float = Field(1000.0, gt=0, description="Largest example count any region may weigh in with.")
    timeout: float | None = Field(None, gt=0, le=86400, description="Seconds each protocol stage waits for "
                                  "replies; default: the run's round_timeout_s.")

    @model_validator(mode="after")
    def _flower_rules(self) -> SecAggSettings:
        shares, threshold = self.num_shares, self.reconstruction_threshold
        if isinstance(shares, int) and shares < 3:
            raise ValueError(f"num_shares as an integer must be at least 3, got {shares}")
        if isinstance(shares, float) and not 0 < shares <= 1:
            raise ValueError(f"num_shares as a fraction must be in (0, 1], got {shares}; use an integer for a count")
        if isinstance(threshold, int):
            if threshold < 2:
                raise ValueError(f"reconstruction_threshold as an integer must be at least 2, got {threshold}")
            if isinstance(shares, int) and threshold >= shares:
                raise ValueError(
                    f"reconstruction_threshold ({threshold}) must be less than num_shares ({shares})"
                )
        elif not 0 < threshold <= 1:
            raise ValueError(f"reconstruction_threshold as a fraction must be in (0, 1], got {threshold}")
        if self.modulus_range & (self.modulus_range - 1):
            raise ValueError(f"modulus_range must be a power of 2, got {self.modulus_range}")
        if self.modulus_range <= self.quantization_range:
            raise ValueError(
                f"modulus_range ({self.modulus_range}) must be greater than quantization_range "
                f"({self.quantization_range})"
            )
        return self


class FedRoundCreate(_Schema):
    """Run a federation now (POST /rounds) or, as a schedule's template, whenever the schedule fires."""

    model_name: str = Field(min_length=1, max_length=128, description="Registered model to improve.")
    version: str | None = Field(
        None, max_length=64, description="Version to start from; default: the model's latest version."
    )
    strategy: str = Field(
        "fedavg", max_length=32, description="Aggregation strategy: fedavg, fedprox, fedadam, fedavgm, ..."
    )
    strategy_params: dict[str, Any] = Field(default_factory=dict, description="e.g. {'proximal_mu': 0.1}")
    rounds: int = Field(3, ge=1, le=1000)
    local_epochs: int = Field(1, ge=1, le=100)
    lr: float = Field(1e-3, gt=0, le=10)
    batch_size: int = Field(32, ge=1, le=65536)
    soft_weight: float = Field(0.5, ge=0, le=1, description="Weight of the cloud's soft targets vs hard labels.")
    min_available: int = Field(1, ge=1, description="SuperNodes that must be connected before a round starts.")
    min_fit: int = Field(1, ge=1, description="Regions that must return an update for a round to count.")
    fraction_fit: float = Field(1.0, gt=0, le=1)
    fraction_evaluate: float = Field(
        1.0, ge=0, le=1, description="Share of SuperNodes that also evaluate the global model on their own data."
    )
    round_timeout_s: float = Field(300.0, gt=0, le=86400)
    differential_privacy: dict[str, Any] | None = None
    secagg: SecAggSettings | None = Field(
        None, description="Switch SecAgg+ on for this run: {} for the defaults, or num_shares, "
        "reconstruction_threshold, clipping_range, quantization_range, modulus_range, max_weight, timeout."
    )
    reference_limit: int | None = Field(None, ge=1, description="Evaluate on a slice of the reference set.")
    reference_data: str | None = Field(
        None,
        max_length=1024,
        description="An .npz (x: model inputs N×C×H×W, y: labels) on the hub's disk replacing the task's "
        "reference set; needed for models of tasks the hub has no data for.",
    )
    gate_min_improvement_pt: float | None = Field(
        None,
        ge=-100,
        le=100,
        description="Register only if the global model beats its parent by this many points on the "
        "reference set; default: the hub's setting.",
    )
    rollout_plan: dict[str, Any] | None = Field(
        None, description="Handed to the rollout controller when the new version passes the gate."
    )


class FedRunPublic(_Schema):
    """A federation run as the hub records it."""

    id: int
    model_name: str
    kind: str
    parent_version: str
    strategy: str
    status: str = Field(description="queued | running | finished | failed")
    stage: str = ""
    reason: str = Field("", description="Why it failed, or what the hand-over decided.")
    result: str = Field("", description="registered | rejected by gate | '' (not finished)")
    flower_run_id: str | None = None
    regions: list[str] = Field(default_factory=list)
    rounds: list[dict[str, Any]] = Field(default_factory=list)
    initial_metrics: dict[str, Any] = Field(default_factory=dict)
    final_metrics: dict[str, Any] = Field(default_factory=dict)
    privacy: dict[str, Any] = Field(default_factory=dict)
    gate: dict[str, Any] = Field(default_factory=dict)
    result_versions: list[str] = Field(default_factory=list)
    rollout: str = ""
    schedule_id: int | None = None
    spec: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None


class FedRunsPublic(_Schema):
    data: list[FedRunPublic]
    count: int


class FedScheduleCreate(_Schema):
    """A cron schedule: ``round`` is the request it submits each time ``cron`` fires (UTC)."""

    cron: str = Field(min_length=1, max_length=128, description="Five-field cron expression, UTC.")
    round: FedRoundCreate
    enabled: bool = True
    rollout_plan: dict[str, Any] | None = Field(
        None, description="Roll out the runs' new versions with this plan; none = register only."
    )


class FedScheduleUpdate(_Schema):
    enabled: bool


class FedSchedulePublic(_Schema):
    id: int
    model_name: str
    cron: str
    spec: dict[str, Any]
    enabled: bool
    next_fire_at: datetime | None = None
    last_fired_at: datetime | None = None
    last_run_id: int | None = None
    last_error: str = ""
    rollout_plan: dict[str, Any] | None = None
    created_at: datetime


class FedSchedulesPublic(_Schema):
    data: list[FedSchedulePublic]
    count: int
