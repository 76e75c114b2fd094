"""``edgefed rollout start | status | list | promote | pause | resume | rollback``: talks to the hub's REST API.

Only typer and the standard library at import time (pydantic models load inside the commands).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from cloud_hub.cli import DEFAULT_HUB, AdminToken, HubUrl, _call, _client, _fail, _table

if TYPE_CHECKING:
    from shared.rollouts import RolloutPublic

__all__ = ["rollout_app"]

rollout_app = typer.Typer(help="Canary and staged rollouts of a model version.", no_args_is_help=True)

RolloutId = Annotated[int, typer.Argument(help="The rollout's id (see `edgefed rollout list`).")]
Reason = Annotated[str, typer.Option(envvar="EDGEFED_ROLLOUT_REASON", help="Why; kept in the rollout's events.")]
AsJson = Annotated[bool, typer.Option("--json", envvar="EDGEFED_ROLLOUT_JSON", help="Print the rollout as JSON.")]


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _gates(values: list[str]) -> dict[str, float | int | None]:
    out: dict[str, float | int | None] = {}
    for item in values:
        name, sep, raw = item.partition("=")
        if not sep or not name.strip():
            _fail(f"--gate {item!r}: write NAME=VALUE, e.g. --gate max_agreement_drop=0.1", code=2)
        raw = raw.strip()
        try:
            out[name.strip()] = None if raw.lower() in ("", "none") else (int(raw) if raw.isdigit() else float(raw))
        except ValueError:
            _fail(f"--gate {item!r}: {raw!r} is not a number", code=2)
    return out


def _print(r: RolloutPublic, as_json: bool) -> None:
    from shared.rollouts import rollout_summary

    if as_json:
        typer.echo(r.model_dump_json(indent=2))
        return
    for line in rollout_summary(r):
        typer.echo(line)


@rollout_app.command("start")
def start(
    version: Annotated[str, typer.Argument(help="The edge model version to roll out.")],
    model: Annotated[
        str | None,
        typer.Option(envvar="EDGEFED_MODEL", help="Edge model name; default: the hub's default.", show_default=False),
    ] = None,
    regions: Annotated[
        str, typer.Option(envvar="EDGEFED_ROLLOUT_REGIONS", help="Target regions, comma-separated.")
    ] = "",
    devices: Annotated[
        str, typer.Option(envvar="EDGEFED_ROLLOUT_DEVICES", help="Target devices, comma-separated.")
    ] = "",
    canary: Annotated[
        str, typer.Option(envvar="EDGEFED_ROLLOUT_CANARY", help="Canary size: a count ('2') or a share ('10%').")
    ] = "1",
    canary_devices: Annotated[
        str, typer.Option(envvar="EDGEFED_ROLLOUT_CANARY_DEVICES", help="Exactly these devices form the canary.")
    ] = "",
    waves: Annotated[
        str, typer.Option(envvar="EDGEFED_ROLLOUT_WAVES", help="Cumulative wave percentages, ending at 100.")
    ] = "10,50,100",
    window: Annotated[
        float, typer.Option(envvar="EDGEFED_ROLLOUT_WINDOW_S", help="Observation window of each wave (seconds).")
    ] = 300.0,
    canary_window: Annotated[
        float | None,
        typer.Option(envvar="EDGEFED_ROLLOUT_CANARY_WINDOW_S", help="Canary window; default: --window.",
                     show_default=False),
    ] = None,
    manual_promote: Annotated[
        bool, typer.Option(envvar="EDGEFED_ROLLOUT_MANUAL_PROMOTE", help="Wait for `promote` after each wave.")
    ] = False,
    gate: Annotated[
        list[str] | None,
        typer.Option(envvar="EDGEFED_ROLLOUT_GATES", help="Gate threshold NAME=VALUE (repeatable), "
                     "e.g. max_agreement_drop=0.1, min_requests=50.", show_default=False),
    ] = None,
    wait: Annotated[
        bool, typer.Option(envvar="EDGEFED_ROLLOUT_WAIT", help="Follow the rollout until it succeeds or rolls back.")
    ] = False,
    timeout: Annotated[
        float, typer.Option(envvar="EDGEFED_ROLLOUT_TIMEOUT_S", help="With --wait: give up after this many seconds.")
    ] = 3600.0,
    as_json: AsJson = False,
    hub: HubUrl = DEFAULT_HUB,
    token: AdminToken = None,
) -> None:
    """Start a rollout: the canary group gets VERSION now; each wave that passes its gates is promoted."""
    from pydantic import ValidationError

    from shared.rollouts import RolloutCreate, wait_for_rollout

    body: dict[str, object] = {"model_name": model, "version": version, "window_s": window,
                               "manual_promote": manual_promote}
    body["target"] = {"regions": _split(regions), "devices": _split(devices)}
    if canary_devices:
        body["canary_devices"] = _split(canary_devices)
    elif canary.strip().endswith("%"):
        body["canary_percent"] = canary.strip().rstrip("%")
    else:
        body["canary_count"] = canary.strip()
    if canary_window is not None:
        body["canary_window_s"] = canary_window
    body["waves"] = [{"percent": p} for p in _split(waves)]
    if gate:
        body["gates"] = _gates(gate)
    try:
        plan = RolloutCreate.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(map(str, err["loc"])) or "plan"
        _fail(f"invalid rollout plan ({where}): {err['msg']}", code=2)
    with _client(hub, token) as client:
        r = _call(lambda: client.start_rollout(plan))
        if wait:
            def show(x: RolloutPublic) -> None:
                typer.echo(f"rollout {x.id}: {x.state}, {x.waves[x.current_wave].name}", err=True)

            try:
                r = _call(lambda: wait_for_rollout(client, r.id, timeout_s=timeout, on_change=show))
            except TimeoutError as exc:
                _fail(str(exc))
    _print(r, as_json)
    if wait and r.state != "succeeded":
        raise typer.Exit(1)


@rollout_app.command("status")
def status(rollout_id: RolloutId, as_json: AsJson = False, hub: HubUrl = DEFAULT_HUB, token: AdminToken = None) -> None:
    """Print a rollout: each wave's decision with its gates' values, baseline and limits, and device counts."""
    with _client(hub, token) as client:
        r = _call(lambda: client.get_rollout(rollout_id))
    _print(r, as_json)
    if not as_json:
        _table(["DEVICE", "WAVE", "STATUS", "PREVIOUS", "ASSIGNED", "RUNNING", "ONLINE"], [
            [d.device_id, "-" if d.wave is None else str(d.wave), d.status, d.previous_version or "-",
             d.assigned_version or "-", d.running_version or "-", "yes" if d.online else "no"]
            for d in r.devices
        ])


@rollout_app.command("list")
def list_rollouts(
    state: Annotated[
        str | None,
        typer.Option(envvar="EDGEFED_ROLLOUT_STATE", help="Only rollouts in this state.", show_default=False),
    ] = None,
    hub: HubUrl = DEFAULT_HUB,
    token: AdminToken = None,
) -> None:
    """List rollouts, newest first."""
    with _client(hub, token) as client:
        rs = _call(lambda: client.list_rollouts(state))
    if not rs.data:
        typer.echo("no rollouts")
        return
    _table(["ID", "MODEL", "VERSION", "TARGET", "STATE", "WAVE", "CREATED"], [
        [str(r.id), r.model_name, r.version, r.target, r.state, r.waves[r.current_wave].name,
         r.created_at.isoformat(timespec="seconds")]
        for r in rs.data
    ])


def _action(action: str, rollout_id: int, reason: str, hub: str, token: str | None) -> None:
    with _client(hub, token) as client:
        r = _call(lambda: client.rollout_action(rollout_id, action, reason))
    _print(r, False)


@rollout_app.command("promote")
def promote(rollout_id: RolloutId, reason: Reason = "", hub: HubUrl = DEFAULT_HUB, token: AdminToken = None) -> None:
    """Start the next wave now (after a wave waiting for a manual promote, or skipping a window)."""
    _action("promote", rollout_id, reason, hub, token)


@rollout_app.command("pause")
def pause(rollout_id: RolloutId, reason: Reason = "", hub: HubUrl = DEFAULT_HUB, token: AdminToken = None) -> None:
    """Stop judging and promoting; devices keep what they were assigned."""
    _action("pause", rollout_id, reason, hub, token)


@rollout_app.command("resume")
def resume(rollout_id: RolloutId, reason: Reason = "", hub: HubUrl = DEFAULT_HUB, token: AdminToken = None) -> None:
    """Continue a paused rollout; the current wave's window starts again."""
    _action("resume", rollout_id, reason, hub, token)


@rollout_app.command("rollback")
def rollback(rollout_id: RolloutId, reason: Reason = "", hub: HubUrl = DEFAULT_HUB, token: AdminToken = None) -> None:
    """Return every device that got the new version to the exact version it ran before."""
    _action("rollback", rollout_id, reason, hub, token)
