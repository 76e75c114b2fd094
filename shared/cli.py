"""The ``edgefed`` command line: one entry point that assembles each part's commands.

Part modules are imported here, so none of them may import torch (or any other heavy module) at
import time: an edge-only install must be able to run ``edgefed agent ...`` without torch.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from cloud_hub.cli import device_app, hub_app
from cloud_hub.cli import list_models as _list_models
from cloud_hub.cli import push as _push
from cloud_hub.factory.cli import compress as _compress
from cloud_hub.factory.cli import train as _train
from cloud_hub.rollouts.cli import rollout_app
from cloud_hub.token_cli import token_app
from edge_agent.cli import agent_app
from federation.cli import fed_app
from shared.bench.cli import bench_app

__all__ = ["app", "main"]

app = typer.Typer(
    name="edgefed",
    help="Edge-cloud federated deployment: edge agents, cloud hub, federation, rollouts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

model_app = typer.Typer(help="Train, compress, push and list models.", no_args_is_help=True)
model_app.command("train")(_train)
model_app.command("compress")(_compress)
model_app.command("push")(_push)
model_app.command("list")(_list_models)

hub_app.add_typer(token_app, name="token")
app.add_typer(hub_app, name="hub")
app.add_typer(model_app, name="model")
app.add_typer(agent_app, name="agent")
app.add_typer(device_app, name="device")
app.add_typer(bench_app, name="bench")
app.add_typer(fed_app, name="fed")
app.add_typer(rollout_app, name="rollout")


@app.callback()
def _root(
    log_level: Annotated[str, typer.Option(envvar="EDGEFED_LOG_LEVEL", help="Logging level.")] = "INFO",
    log_format: Annotated[
        str, typer.Option(envvar="EDGEFED_LOG_FORMAT", help="Log lines as 'text' or 'json' (one object a line).")
    ] = "text",
) -> None:
    from shared.logs import configure_logging

    try:
        configure_logging(log_level, log_format.lower())
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--log-level/--log-format") from None
    # One line per HTTP request from the clients is noise at INFO; their errors still show.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


@app.command()
def broker(
    host: Annotated[str, typer.Option(envvar="EDGEFED_BROKER_HOST", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="EDGEFED_BROKER_PORT", help="TCP port.")] = 1883,
    data_dir: Annotated[
        Path, typer.Option(envvar="EDGEFED_BROKER_DATA_DIR", help="Config, persistence and log directory.")
    ] = Path(".edgefed/broker"),
) -> None:
    """Run Eclipse Mosquitto with a generated development config (loopback, no TLS)."""
    import os

    from shared.broker import BrokerNotFound, DevBroker

    b = DevBroker(host, port, data_dir)
    try:
        argv = b.argv()
    except BrokerNotFound as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"mosquitto on mqtt://{host}:{port} (config {data_dir}/mosquitto.conf)")
    # Replace this process so signals reach mosquitto directly.
    os.execv(argv[0], argv)


@app.command()
def demo(
    workdir: Annotated[
        Path, typer.Option(envvar="EDGEFED_DEMO_DIR", help="Where models, logs and the report go.")
    ] = Path("demo-output"),
    epochs: Annotated[
        int, typer.Option(envvar="EDGEFED_DEMO_EPOCHS", help="Training epochs (0 = the factory defaults).")
    ] = 0,
    retrain: Annotated[bool, typer.Option(help="Train again even if cached checkpoints exist.")] = False,
) -> None:
    """Run the whole loop on one machine and print a summary."""
    from shared.demo import run_demo

    raise typer.Exit(run_demo(workdir, epochs=epochs or None, retrain=retrain))


# Which extra provides a module that a command imports lazily, for a clear message on a partial install.
_EXTRA_OF = {
    "torch": "hub", "sqlalchemy": "hub", "alembic": "hub", "onnx": "hub", "onnxscript": "hub",
    "prometheus_client": "hub", "elpv_dataset": "hub", "fastapi": "hub",
    "onnxruntime": "edge", "starlette": "edge", "uvicorn": "edge", "PIL": "edge", "multipart": "edge",
}


def main() -> None:
    try:
        app()
    except ModuleNotFoundError as exc:
        root = (exc.name or "").split(".")[0]
        extra = _EXTRA_OF.get(root)
        if extra is None:
            raise
        typer.echo(
            f"error: this command needs the '{extra}' extra, but module {root!r} is not installed: "
            f"pip install 'edgefed[{extra}]'",
            err=True,
        )
        raise SystemExit(2) from None
