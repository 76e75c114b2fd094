"""``edgefed fed superlink | supernode | run | schedule | status``."""

from __future__ import annotations

import typer

__all__ = ["fed_app"]

fed_app = typer.Typer(help="Federated learning on Flower's deployment engine.", no_args_is_help=True)
