"""``edgefed hub token create|list|rotate|revoke``: API tokens through the hub's REST API.

Only typer and the standard library at import time (see ``cloud_hub.cli``).
"""

from __future__ import annotations

from typing import Annotated

import typer

from cloud_hub.cli import DEFAULT_HUB, HubUrl, _call, _client, _fail, _table

__all__ = ["token_app"]

token_app = typer.Typer(help="Create, list, rotate and revoke admin and device API tokens.", no_args_is_help=True)

AdminTokenOpt = Annotated[
    str | None,
    typer.Option(
        "--admin-token", envvar="EDGEFED_ADMIN_TOKEN", help="Admin bearer token of the hub.", show_default=False
    ),
]


@token_app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="What the token is for (shown in `token list`).")],
    role: Annotated[str, typer.Option(envvar="EDGEFED_TOKEN_ROLE", help="admin or device.")] = "admin",
    device: Annotated[
        str | None,
        typer.Option(envvar="EDGEFED_DEVICE_ID", help="The registered device of a device token.", show_default=False),
    ] = None,
    replace: Annotated[
        bool, typer.Option(envvar="EDGEFED_TOKEN_REPLACE", help="Revoke the device's other live tokens.")
    ] = False,
    hub: HubUrl = DEFAULT_HUB,
    admin_token: AdminTokenOpt = None,
) -> None:
    """Create a token and print it (the hub shows it only this once; it stores only its hash)."""
    if role not in ("admin", "device"):
        _fail(f"--role must be admin or device, not {role!r}", code=2)
    with _client(hub, admin_token) as client:
        created = _call(lambda: client.create_token(name, role, device, replace))
    typer.echo(f"created token {created.id} ({created.role}{f' for {created.device_id}' if created.device_id else ''})",
               err=True)
    typer.echo(created.token)


@token_app.command("list")
def list_tokens(
    device: Annotated[
        str | None, typer.Option(envvar="EDGEFED_DEVICE_ID", help="Only this device's tokens.", show_default=False)
    ] = None,
    active_only: Annotated[
        bool, typer.Option("--active-only", envvar="EDGEFED_TOKEN_ACTIVE_ONLY", help="Hide revoked tokens.")
    ] = False,
    hub: HubUrl = DEFAULT_HUB,
    admin_token: AdminTokenOpt = None,
) -> None:
    """Print tokens (never their secrets): id, name, role, device, created, last used, revoked."""
    with _client(hub, admin_token) as client:
        tokens = _call(lambda: client.list_tokens(limit=1000, device_id=device, active=True if active_only else None))

    def when(t: object) -> str:
        return t.isoformat(timespec="seconds") if t is not None else "-"  # type: ignore[attr-defined]

    rows = [
        [str(t.id), t.name, t.role, t.device_id or "-", when(t.created_at), when(t.last_used_at), when(t.revoked_at)]
        for t in tokens.data
    ]
    if not rows:
        typer.echo("no tokens")
        return
    _table(["ID", "NAME", "ROLE", "DEVICE", "CREATED", "LAST USED", "REVOKED"], rows)


@token_app.command("rotate")
def rotate(
    token_id: Annotated[int, typer.Argument(help="Id of the token to replace (see `token list`).")],
    hub: HubUrl = DEFAULT_HUB,
    admin_token: AdminTokenOpt = None,
) -> None:
    """Revoke a token and print its successor (same name, role and device), shown only this once."""
    with _client(hub, admin_token) as client:
        created = _call(lambda: client.rotate_token(token_id))
    typer.echo(f"token {token_id} revoked; its successor is token {created.id}", err=True)
    typer.echo(created.token)


@token_app.command("revoke")
def revoke(
    token_id: Annotated[int, typer.Argument(help="Id of the token to revoke (see `token list`).")],
    hub: HubUrl = DEFAULT_HUB,
    admin_token: AdminTokenOpt = None,
) -> None:
    """Revoke a token: it stops working with its next request."""
    with _client(hub, admin_token) as client:
        revoked = _call(lambda: client.revoke_token(token_id))
    typer.echo(f"token {revoked.id} ({revoked.name}) revoked at {revoked.revoked_at}")
