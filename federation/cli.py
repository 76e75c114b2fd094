"""``edgefed fed superlink | supernode | run | schedule | status``."""

from __future__ import annotations

import typer

__all__ = ["fed_app"]

fed_app = typer.Typer(help="Federated learning on Flower's deployment engine.", no_args_is_help=True)

# Flower processes (federation/flower_cli.py): SuperLink next to the hub, one SuperNode per region.
from federation import flower_cli  # noqa: E402

fed_app.command("superlink")(flower_cli.superlink)
fed_app.command("supernode")(flower_cli.supernode)

# Admin commands over the hub's REST API (federation/admin_cli.py).
from federation import admin_cli  # noqa: E402

fed_app.command("run")(admin_cli.run)
fed_app.command("status")(admin_cli.status)
fed_app.add_typer(admin_cli.schedule_app, name="schedule")
