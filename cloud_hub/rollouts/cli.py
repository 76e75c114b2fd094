"""``edgefed rollout start | status | rollback | pause | resume | promote``: talks to the hub's REST API."""

from __future__ import annotations

import typer

__all__ = ["rollout_app"]

rollout_app = typer.Typer(help="Canary and staged rollouts of a model version.", no_args_is_help=True)
