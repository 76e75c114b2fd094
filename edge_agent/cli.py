"""``edgefed agent ...``: the edge agent's command line.

Only typer and the standard library at import time: onnxruntime, fastapi and uvicorn load inside
the command, and torch never does, so ``edgefed agent run`` works on an edge-only install.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

__all__ = ["agent_app", "run"]

agent_app = typer.Typer(
    help="Run the edge agent: local inference with escalation to the hub.", no_args_is_help=True
)


@agent_app.callback()
def _agent() -> None:
    """The edge agent: local inference with escalation to the hub."""


@agent_app.command()
def run(
    hub: Annotated[
        str, typer.Option(envvar="EDGEFED_HUB_URL", help="Hub base URL, e.g. http://127.0.0.1:8080.")
    ],
    broker: Annotated[str, typer.Option(envvar="EDGEFED_BROKER_URL", help="Broker URL: mqtt://HOST:PORT.")],
    device_id: Annotated[
        str, typer.Option(envvar="EDGEFED_DEVICE_ID", help="This device's id (as registered).")
    ],
    region: Annotated[
        str, typer.Option(envvar="EDGEFED_REGION", help="Region (site) this device belongs to.")
    ],
    token: Annotated[
        str | None,
        typer.Option(
            envvar="EDGEFED_DEVICE_TOKEN", help="Device token issued by the hub.", show_default=False
        ),
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            envvar="EDGEFED_AGENT_DATA_DIR",
            help="Bundles and pinned keys; default .edgefed/agent-<device id>.",
        ),
    ] = None,
    threshold: Annotated[
        float,
        typer.Option(
            envvar="EDGEFED_THRESHOLD", help="Escalate when the edge model's confidence is below this (0..1)."
        ),
    ] = 0.8,
    policy: Annotated[
        str,
        typer.Option(envvar="EDGEFED_POLICY", help="Escalation policy: threshold, edge-only or cloud-only."),
    ] = "threshold",
    escalation_timeout: Annotated[
        float,
        typer.Option(
            envvar="EDGEFED_ESCALATION_TIMEOUT",
            help="Seconds to wait for the hub's answer before answering at the edge.",
        ),
    ] = 1.0,
    host: Annotated[
        str, typer.Option(envvar="EDGEFED_AGENT_HOST", help="Address of the local API.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="EDGEFED_AGENT_PORT", help="Port of the local API.")] = 8090,
    trusted_key: Annotated[
        Path | None,
        typer.Option(
            envvar="EDGEFED_TRUSTED_KEY",
            help="PEM public key(s) bundles must be signed with; default: the hub's "
            "keys, pinned on first use.",
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            envvar="EDGEFED_MODEL",
            help="Model name to prefer among bundles on disk when the hub is unreachable.",
        ),
    ] = None,
    outbox_max: Annotated[
        int,
        typer.Option(
            envvar="EDGEFED_OUTBOX_MAX",
            help="Unanswered escalations kept on disk for a later re-send (oldest dropped beyond this).",
        ),
    ] = 10_000,
    threads: Annotated[
        int, typer.Option(envvar="EDGEFED_AGENT_THREADS", help="onnxruntime intra-op threads.")
    ] = 1,
) -> None:
    """Serve the assigned model on a local HTTP API and escalate unsure cases to the hub over MQTT."""
    from edge_agent.config import SettingsError, build_settings

    try:
        settings = build_settings(
            hub_url=hub,
            broker_url=broker,
            device_id=device_id,
            region=region,
            token=token,
            data_dir=data_dir,
            threshold=threshold,
            policy=policy,
            escalation_timeout_s=escalation_timeout,
            host=host,
            port=port,
            trusted_key=trusted_key,
            model_name=model,
            intra_op_threads=threads,
            outbox_max_items=outbox_max,
        )
    except SettingsError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None

    from edge_agent.agent import Agent, AgentStartError
    from edge_agent.bundles import TrustError
    from edge_agent.runtime import ModelError

    # httpx logs every request at INFO; the agent's own log lines already say what it asked the hub.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger(__name__).info("starting agent %s (data in %s)", settings.device_id, settings.root)
    try:
        Agent(settings).serve()
    except (AgentStartError, TrustError, ModelError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
