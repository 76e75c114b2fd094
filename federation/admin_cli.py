"""``edgefed fed run | status | schedule ...``: the admin's side of federation, over the hub's REST API.

Only typer and the standard library at import time; the hub client loads inside the commands.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cloud_hub.cli import DEFAULT_HUB, _call, _client, _fail, _table

if TYPE_CHECKING:
    from shared.federation_api import FedRoundCreate, FedRunPublic

__all__ = ["run", "status", "schedule_app"]

schedule_app = typer.Typer(help="Cron schedules of federation runs (UTC).", no_args_is_help=True)

Hub = Annotated[str, typer.Option("--hub", envvar="EDGEFED_HUB_URL", help="Hub base URL.")]
Token = Annotated[
    str | None,
    typer.Option("--admin-token", "--token", envvar="EDGEFED_ADMIN_TOKEN", help="Admin bearer token.",
                 show_default=False),
]
Model = Annotated[str, typer.Option("--model", envvar="EDGEFED_FED_MODEL", help="Registered model to improve.")]
Version = Annotated[
    str | None,
    typer.Option(envvar="EDGEFED_FED_VERSION", help="Version to start from; default: the latest.", show_default=False),
]
Strategy = Annotated[
    str, typer.Option(envvar="EDGEFED_FED_STRATEGY", help="fedavg, fedprox, fedadam, fedavgm, ...")
]
StrategyParams = Annotated[
    list[str] | None,
    typer.Option("--strategy-param", envvar="EDGEFED_FED_STRATEGY_PARAMS",
                 help="Strategy parameter KEY=VALUE (repeatable), e.g. proximal_mu=0.1.", show_default=False),
]
Rounds = Annotated[int, typer.Option(envvar="EDGEFED_FED_ROUNDS", help="Federated rounds.")]
LocalEpochs = Annotated[int, typer.Option(envvar="EDGEFED_FED_LOCAL_EPOCHS", help="Local epochs per round.")]
Lr = Annotated[float, typer.Option(envvar="EDGEFED_FED_LR", help="Local learning rate.")]
BatchSize = Annotated[int, typer.Option(envvar="EDGEFED_FED_BATCH_SIZE", help="Local batch size.")]
MinAvailable = Annotated[
    int, typer.Option(envvar="EDGEFED_FED_MIN_AVAILABLE", help="SuperNodes connected before a round starts.")
]
MinFit = Annotated[int, typer.Option(envvar="EDGEFED_FED_MIN_FIT", help="Regions that must return an update.")]
RoundTimeout = Annotated[
    float, typer.Option(envvar="EDGEFED_FED_ROUND_TIMEOUT", help="Seconds a round may take.")
]
GateMargin = Annotated[
    float | None,
    typer.Option(envvar="EDGEFED_FED_GATE_MARGIN",
                 help="Points the new model must gain over its parent; default: the hub's setting.",
                 show_default=False),
]
ReferenceLimit = Annotated[
    int | None,
    typer.Option(envvar="EDGEFED_FED_REFERENCE_LIMIT", help="Evaluate on a slice of the reference set.",
                 show_default=False),
]
ReferenceData = Annotated[
    str | None,
    typer.Option(envvar="EDGEFED_FED_REFERENCE_DATA",
                 help="An .npz (x, y) on the hub's disk replacing the task's reference set.", show_default=False),
]
RolloutPlan = Annotated[
    Path | None,
    typer.Option(envvar="EDGEFED_FED_ROLLOUT_PLAN",
                 help="JSON rollout plan (as POST /api/v1/rollouts, without model and version) applied when "
                 "the new version passes the gate.", show_default=False),
]


def _round(
    model: str, version: str | None, strategy: str, strategy_param: list[str] | None, rounds: int,
    local_epochs: int, lr: float, batch_size: int, min_available: int, min_fit: int, round_timeout: float,
    gate_margin: float | None, reference_limit: int | None, reference_data: str | None, plan: dict[str, Any] | None,
) -> FedRoundCreate:
    from pydantic import ValidationError

    from shared.federation_api import FedRoundCreate

    params: dict[str, Any] = {}
    for item in strategy_param or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            _fail(f"--strategy-param {item!r}: expected KEY=VALUE", code=2)
        try:
            params[key] = json.loads(raw)
        except json.JSONDecodeError:
            params[key] = raw
    try:
        return FedRoundCreate(
            model_name=model, version=version, strategy=strategy, strategy_params=params, rounds=rounds,
            local_epochs=local_epochs, lr=lr, batch_size=batch_size, min_available=min_available, min_fit=min_fit,
            round_timeout_s=round_timeout, gate_min_improvement_pt=gate_margin, reference_limit=reference_limit,
            reference_data=reference_data, rollout_plan=plan,
        )
    except ValidationError as exc:
        err = exc.errors()[0]
        _fail(f"invalid option {'.'.join(map(str, err['loc']))}: {err['msg']}", code=2)


def _load_plan(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        plan = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        _fail(f"--rollout-plan {path}: {exc}", code=2)
    if not isinstance(plan, dict):
        _fail(f"--rollout-plan {path}: expected a JSON object", code=2)
    return plan


def run(
    model: Model,
    version: Version = None,
    strategy: Strategy = "fedavg",
    strategy_param: StrategyParams = None,
    rounds: Rounds = 3,
    local_epochs: LocalEpochs = 1,
    lr: Lr = 1e-3,
    batch_size: BatchSize = 32,
    min_available: MinAvailable = 1,
    min_fit: MinFit = 1,
    round_timeout: RoundTimeout = 300.0,
    gate_margin: GateMargin = None,
    reference_limit: ReferenceLimit = None,
    reference_data: ReferenceData = None,
    rollout_plan: RolloutPlan = None,
    source_checkpoint: Annotated[
        Path | None,
        typer.Option(envvar="EDGEFED_FED_SOURCE_CHECKPOINT",
                     help="Upload this PyTorch checkpoint as the source of the edge version first.",
                     show_default=False),
    ] = None,
    wait: Annotated[bool, typer.Option(envvar="EDGEFED_FED_WAIT", help="Wait until the run ends.")] = False,
    timeout: Annotated[float, typer.Option(envvar="EDGEFED_FED_WAIT_TIMEOUT", help="Seconds --wait waits.")] = 3600.0,
    hub: Hub = DEFAULT_HUB,
    admin_token: Token = None,
) -> None:
    """Run a federation now; prints the run id (with --wait: the outcome; exit 1 if the run failed)."""
    body = _round(model, version, strategy, strategy_param, rounds, local_epochs, lr, batch_size, min_available,
                  min_fit, round_timeout, gate_margin, reference_limit, reference_data, _load_plan(rollout_plan))
    with _client(hub, admin_token) as client:
        if source_checkpoint is not None:
            target = version or _call(lambda: client.list_versions(model)).data[0].version
            _call(lambda: client.put_source_checkpoint(model, target, source_checkpoint))
            typer.echo(f"uploaded {source_checkpoint} as the source checkpoint of {model}:{target}")
        started = _call(lambda: client.start_federation(body))
        typer.echo(f"federation run {started.id} {started.status}: {model} from version {started.parent_version}, "
                   f"{started.strategy}, {rounds} round(s)")
        if not wait:
            return
        deadline = time.monotonic() + timeout
        current = started
        while current.status in ("queued", "running"):
            if time.monotonic() > deadline:
                _fail(f"federation run {current.id} still {current.status} after {timeout:g} s")
            time.sleep(2.0)
            current = _call(lambda: client.get_federation_run(started.id))
    _print_run(current)
    if current.status == "failed":
        raise typer.Exit(1)


def status(
    run_id: Annotated[int | None, typer.Argument(help="A run id; without it, list recent runs.")] = None,
    model: Annotated[
        str | None, typer.Option("--model", envvar="EDGEFED_FED_MODEL", help="Only runs of this model.",
                                 show_default=False)
    ] = None,
    hub: Hub = DEFAULT_HUB,
    admin_token: Token = None,
) -> None:
    """Show one federation run (state, reason, per-round metrics, result) or list the recent ones."""
    with _client(hub, admin_token) as client:
        if run_id is not None:
            _print_run(_call(lambda: client.get_federation_run(run_id)))
            return
        runs = _call(lambda: client.list_federation_runs(model=model))
    if not runs.data:
        typer.echo("no federation runs")
        return
    rows = [
        [str(r.id), r.model_name, r.parent_version, r.strategy, r.status, r.result or "-",
         ",".join(r.result_versions) or "-", r.created_at.isoformat(timespec="seconds"), _short(r.reason)]
        for r in runs.data
    ]
    _table(["RUN", "MODEL", "FROM", "STRATEGY", "STATUS", "RESULT", "NEW VERSION", "CREATED", "REASON"], rows)


@schedule_app.command("create")
def schedule_create(
    cron: Annotated[str, typer.Option(envvar="EDGEFED_FED_CRON", help="Five-field cron expression, UTC.")],
    model: Model,
    version: Version = None,
    strategy: Strategy = "fedavg",
    strategy_param: StrategyParams = None,
    rounds: Rounds = 3,
    local_epochs: LocalEpochs = 1,
    lr: Lr = 1e-3,
    batch_size: BatchSize = 32,
    min_available: MinAvailable = 1,
    min_fit: MinFit = 1,
    round_timeout: RoundTimeout = 300.0,
    gate_margin: GateMargin = None,
    reference_limit: ReferenceLimit = None,
    reference_data: ReferenceData = None,
    rollout_plan: RolloutPlan = None,
    disabled: Annotated[bool, typer.Option(envvar="EDGEFED_FED_DISABLED", help="Create it disabled.")] = False,
    hub: Hub = DEFAULT_HUB,
    admin_token: Token = None,
) -> None:
    """Run a federation whenever CRON fires; prints the schedule and its next fire time."""
    from shared.federation_api import FedScheduleCreate

    body = _round(model, version, strategy, strategy_param, rounds, local_epochs, lr, batch_size, min_available,
                  min_fit, round_timeout, gate_margin, reference_limit, reference_data, None)
    with _client(hub, admin_token) as client:
        created = _call(lambda: client.create_schedule(
            FedScheduleCreate(cron=cron, round=body, enabled=not disabled, rollout_plan=_load_plan(rollout_plan))))
    nxt = created.next_fire_at.isoformat(timespec="seconds") if created.next_fire_at else "never (disabled)"
    typer.echo(f"schedule {created.id}: {created.model_name} at '{created.cron}' (UTC), next {nxt}")


@schedule_app.command("list")
def schedule_list(hub: Hub = DEFAULT_HUB, admin_token: Token = None) -> None:
    """Print every schedule: cron, model, enabled, next fire time, last run and last error."""
    with _client(hub, admin_token) as client:
        schedules = _call(client.list_schedules)
    if not schedules.data:
        typer.echo("no federation schedules")
        return
    rows = [
        [str(s.id), s.model_name, s.cron, "yes" if s.enabled else "no",
         s.next_fire_at.isoformat(timespec="seconds") if s.next_fire_at else "-",
         str(s.last_run_id or "-"), _short(s.last_error)]
        for s in schedules.data
    ]
    _table(["ID", "MODEL", "CRON", "ENABLED", "NEXT (UTC)", "LAST RUN", "LAST ERROR"], rows)


@schedule_app.command("delete")
def schedule_delete(
    schedule_id: Annotated[int, typer.Argument(help="The schedule's id.")],
    hub: Hub = DEFAULT_HUB,
    admin_token: Token = None,
) -> None:
    """Delete a schedule; runs it started keep their records."""
    with _client(hub, admin_token) as client:
        _call(lambda: client.delete_schedule(schedule_id))
    typer.echo(f"deleted schedule {schedule_id}")


@schedule_app.command("enable")
def schedule_enable(
    schedule_id: Annotated[int, typer.Argument(help="The schedule's id.")],
    hub: Hub = DEFAULT_HUB,
    admin_token: Token = None,
) -> None:
    """Enable a schedule; its next fire time is computed from now."""
    _set_enabled(schedule_id, True, hub, admin_token)


@schedule_app.command("disable")
def schedule_disable(
    schedule_id: Annotated[int, typer.Argument(help="The schedule's id.")],
    hub: Hub = DEFAULT_HUB,
    admin_token: Token = None,
) -> None:
    """Disable a schedule; it keeps its settings and fires again once enabled."""
    _set_enabled(schedule_id, False, hub, admin_token)


def _set_enabled(schedule_id: int, enabled: bool, hub: str, token: str | None) -> None:
    with _client(hub, token) as client:
        s = _call(lambda: client.set_schedule_enabled(schedule_id, enabled))
    nxt = s.next_fire_at.isoformat(timespec="seconds") if s.next_fire_at else "-"
    typer.echo(f"schedule {s.id} {'enabled' if s.enabled else 'disabled'}; next {nxt}")


def _print_run(r: FedRunPublic) -> None:
    typer.echo(f"run {r.id}: {r.model_name} from {r.parent_version}, {r.strategy} — {r.status}"
               + (f" ({r.result})" if r.result else ""))
    if r.reason:
        typer.echo(f"  reason: {r.reason}")
    if r.flower_run_id:
        typer.echo(f"  Flower run: {r.flower_run_id}")
    if r.regions:
        typer.echo(f"  regions: {', '.join(r.regions)}")
    for rd in r.rounds:
        metrics = ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in rd.items() if k != "round"
        )
        typer.echo(f"  round {rd.get('round', '?')}: {metrics}")
    if r.result_versions:
        typer.echo(f"  new version(s): {', '.join(r.result_versions)}")
    if r.rollout:
        typer.echo(f"  rollout: {r.rollout}")


def _short(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
