"""Rollout plans and reports: the REST schemas of ``/api/v1/rollouts``, shared by the hub, the CLI and
the demo, and two helpers for callers: ``wait_for_rollout`` and ``rollout_summary``.

A plan names a model version, a target (every device of the model, some regions, or a device list),
a canary group (a count or a percentage, or named devices), then waves of cumulative percentages,
each observed for a window. Gates compare the devices on the new version with those still on the
previous one over the same window; thresholds have defaults and can be set per plan.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    from shared.hub_client import HubClient

__all__ = [
    "ACTIVE_STATES",
    "FINAL_STATES",
    "GateResult",
    "GateThresholds",
    "RolloutCreate",
    "RolloutDevicePublic",
    "RolloutEvent",
    "RolloutPublic",
    "RolloutState",
    "RolloutTarget",
    "RolloutsPublic",
    "WavePublic",
    "WaveSpec",
    "assign_now",
    "canary_then_all",
    "rollout_summary",
    "wait_for_rollout",
]

RolloutState = Literal["running", "paused", "awaiting_promotion", "succeeded", "rolled_back"]
ACTIVE_STATES: tuple[str, ...] = ("running", "paused", "awaiting_promotion")
FINAL_STATES: tuple[str, ...] = ("succeeded", "rolled_back")


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


_MAX_WINDOW_S = 7 * 86400.0


class RolloutTarget(_Schema):
    """Which devices: those of ``regions``, or exactly ``devices``, or (both empty) every device of the model."""

    regions: list[str] = Field(default_factory=list, max_length=500)
    devices: list[str] = Field(default_factory=list, max_length=10_000)

    @model_validator(mode="after")
    def _one_kind(self) -> RolloutTarget:
        if self.regions and self.devices:
            raise ValueError("give target regions or target devices, not both")
        return self

    def describe(self) -> str:
        if self.devices:
            return f"devices {', '.join(self.devices[:5])}{' ...' if len(self.devices) > 5 else ''}"
        if self.regions:
            return f"regions {', '.join(self.regions)}"
        return "all devices"


class WaveSpec(_Schema):
    """A wave: the share of the target that runs the new version once it starts (cumulative)."""

    percent: float = Field(gt=0, le=100)
    window_s: float | None = Field(default=None, ge=0.2, le=_MAX_WINDOW_S,
                                   description="Observation window; default: the plan's")


class GateThresholds(_Schema):
    """Limits a wave must stay within; 'baseline' is the devices still on the previous version."""

    min_requests: int = Field(20, ge=1, description="Cases on the new version before a wave is judged")
    min_cloud_answers: int = Field(5, ge=1, description="Escalated cases answered by the cloud to judge agreement")
    max_error_rate: float = Field(0.01, ge=0, le=1, description="Model failures per case, absolute cap")
    max_error_rate_increase: float = Field(0.005, ge=0, le=1, description="Over the baseline's error rate")
    max_escalation_rate_increase: float = Field(0.10, ge=0, le=1, description="Over the baseline's rate")
    max_agreement_drop: float = Field(0.15, ge=0, le=1, description="Edge/cloud agreement below the baseline's")
    min_agreement: float | None = Field(None, ge=0, le=1, description="Absolute floor for edge/cloud agreement")
    max_p99_latency_ratio: float = Field(2.0, ge=1, description="Local p99 over the baseline's p99")
    p99_latency_slack_ms: float = Field(5.0, ge=0, description="Increase of local p99 always tolerated (ms)")
    max_p99_latency_ms: float | None = Field(None, gt=0, description="Absolute cap for the local p99 (ms)")
    max_load_failures: int = Field(0, ge=0, description="Devices of the wave that may fail to load the bundle")
    load_grace_s: float = Field(5.0, ge=0, le=_MAX_WINDOW_S,
                                description="Seconds after assignment before a load error counts")


class RolloutCreate(_Schema):
    """A rollout plan (``POST /api/v1/rollouts``)."""

    model_name: str | None = Field(None, max_length=128, description="Edge model; default: the hub's default")
    version: str = Field(min_length=1, max_length=64)
    target: RolloutTarget = Field(default_factory=RolloutTarget)
    canary_count: int | None = Field(None, ge=1, description="Devices in the canary group (default 1)")
    canary_percent: float | None = Field(None, gt=0, le=100, description="Canary group as a share of the target")
    canary_devices: list[str] = Field(default_factory=list, max_length=10_000,
                                      description="Exactly these devices form the canary")
    canary_window_s: float | None = Field(None, ge=0.2, le=_MAX_WINDOW_S,
                                          description="Canary observation; default: window_s")
    waves: list[WaveSpec] = Field(
        default_factory=lambda: [WaveSpec(percent=p) for p in (10.0, 50.0, 100.0)],
        min_length=1,
        max_length=20,
    )
    window_s: float = Field(300.0, ge=0.2, le=_MAX_WINDOW_S,
                            description="Default observation window of each wave (seconds)")
    manual_promote: bool = Field(False, description="Wait for a manual promote after each passing wave")
    gates: GateThresholds = Field(default_factory=GateThresholds)

    @model_validator(mode="after")
    def _check(self) -> RolloutCreate:
        given = sum(x is not None and x != [] for x in (self.canary_count, self.canary_percent, self.canary_devices))
        if given > 1:
            raise ValueError("give the canary as one of canary_count, canary_percent or canary_devices")
        percents = [w.percent for w in self.waves]
        if any(b <= a for a, b in zip(percents, percents[1:], strict=False)):
            raise ValueError(f"wave percentages must increase strictly; got {percents}")
        if percents[-1] != 100:
            raise ValueError(f"the last wave must reach 100 % of the target; it reaches {percents[-1]:g} %")
        return self


class GateResult(_Schema):
    """One gate of one evaluation: ``passed`` None means it could not be judged yet."""

    name: str
    passed: bool | None
    value: float | None = None
    baseline: float | None = None
    limit: float | None = None
    detail: str = ""


class WavePublic(_Schema):
    index: int
    name: str
    percent: float
    window_s: float
    devices: int = 0
    started_at: datetime | None = None
    decided_at: datetime | None = None
    decision: Literal["waiting", "observing", "passed", "failed", "promoted_manually", "rolled_back_manually"] = (
        "waiting"
    )
    gates: list[GateResult] = Field(default_factory=list)
    detail: str = ""


class RolloutDevicePublic(_Schema):
    device_id: str
    wave: int | None = Field(description="Wave that assigned the new version (0 = canary); None: not yet")
    previous_version: str | None
    assigned_version: str | None
    running_version: str | None
    online: bool
    status: Literal["waiting", "pending", "running", "failed", "restored", "restoring"]


class RolloutEvent(_Schema):
    at: datetime
    kind: str
    wave: int | None = None
    detail: str = ""


class RolloutPublic(_Schema):
    id: int
    model_name: str
    version: str
    state: RolloutState
    target: str
    current_wave: int
    plan: RolloutCreate
    waves: list[WavePublic]
    devices: list[RolloutDevicePublic]
    counts: dict[str, int] = Field(description="Devices by status")
    events: list[RolloutEvent]
    failure: dict[str, object] | None = Field(None, description="The wave and gates that failed, with values")
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None = None


class RolloutsPublic(_Schema):
    data: list[RolloutPublic]
    count: int


def wait_for_rollout(
    client: HubClient,
    rollout_id: int,
    *,
    timeout_s: float = 600.0,
    poll_s: float = 1.0,
    until: tuple[str, ...] = FINAL_STATES,
    on_change: Callable[[RolloutPublic], None] | None = None,
) -> RolloutPublic:
    """Poll until the rollout's state is one of ``until``; TimeoutError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last: tuple[str, int] | None = None
    while True:
        r = client.get_rollout(rollout_id)
        if on_change is not None and (r.state, r.current_wave) != last:
            on_change(r)
            last = (r.state, r.current_wave)
        if r.state in until:
            return r
        if time.monotonic() > deadline:
            raise TimeoutError(f"rollout {rollout_id} is still {r.state} (wave {r.current_wave}) after {timeout_s:g} s")
        time.sleep(poll_s)


def assign_now(
    client: HubClient, version: str, device_ids: list[str], *, model_name: str | None = None, reason: str = ""
) -> RolloutPublic:
    """Pin ``device_ids`` to ``version`` at once, skipping the gates: a one-wave rollout promoted by the
    admin as soon as it starts (recorded like any rollout; the devices get the retained assignment)."""
    plan = RolloutCreate(model_name=model_name, version=version, target=RolloutTarget(devices=device_ids),
                         canary_devices=device_ids, waves=[WaveSpec(percent=100)])
    r = client.start_rollout(plan)
    return client.rollout_action(r.id, "promote", reason or "assigned directly, without gates")


def canary_then_all(
    client: HubClient,
    version: str,
    *,
    model_name: str | None = None,
    canary_devices: list[str] | None = None,
    window_s: float = 10.0,
    gates: GateThresholds | None = None,
    timeout_s: float = 300.0,
    on_change: Callable[[RolloutPublic], None] | None = None,
) -> RolloutPublic:
    """Roll ``version`` out to every device of the model: a canary wave (``canary_devices``, default one
    device), then 100 %, each observed ``window_s``; wait until it succeeds or rolls back and return it.
    The fleet must keep answering cases meanwhile, or the gates have nothing to judge (see
    ``GateThresholds.min_requests``). ``rollout_summary(result)`` gives printable lines."""
    plan = RolloutCreate(
        model_name=model_name,
        version=version,
        canary_devices=canary_devices or [],
        waves=[WaveSpec(percent=100)],
        window_s=window_s,
        gates=gates or GateThresholds(),
    )
    r = client.start_rollout(plan)
    return wait_for_rollout(client, r.id, timeout_s=timeout_s, poll_s=0.5, on_change=on_change)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}"


def rollout_summary(r: RolloutPublic) -> list[str]:
    """Human-readable lines: the rollout, each wave's decision and gates, the failure if any."""
    counts = ", ".join(f"{k} {v}" for k, v in sorted(r.counts.items()) if v)
    lines = [f"rollout {r.id}: {r.model_name}:{r.version} to {r.target}: {r.state} ({counts})"]
    for w in r.waves:
        lines.append(f"  {w.name} ({w.percent:g} %, {w.devices} devices, {w.window_s:g} s): {w.decision}"
                     + (f" - {w.detail}" if w.detail else ""))
        for g in w.gates:
            mark = {True: "pass", False: "FAIL", None: "n/a"}[g.passed]
            lines.append(
                f"    {g.name:<16} {mark:<4} value {_fmt(g.value)} baseline {_fmt(g.baseline)} "
                f"limit {_fmt(g.limit)}" + (f"  ({g.detail})" if g.detail else "")
            )
    if r.failure:
        lines.append(f"  failure: {r.failure.get('summary', r.failure)}")
    return lines
