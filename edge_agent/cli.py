"""``edgefed agent ...``: the edge agent's command line.

Only typer and the standard library at import time: onnxruntime, starlette and uvicorn load inside
the command, and torch never does, so ``edgefed agent run`` works on an edge-only install.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

__all__ = ["agent_app", "infer", "rollback", "run"]

agent_app = typer.Typer(help="Run the edge agent: local inference with escalation to the hub.", no_args_is_help=True)


@agent_app.callback()
def _agent() -> None:
    """The edge agent: local inference with escalation to the hub."""


@agent_app.command()
def run(
    hub: Annotated[str, typer.Option(envvar="EDGEFED_HUB_URL", help="Hub base URL, e.g. http://127.0.0.1:8080.")],
    broker: Annotated[str, typer.Option(envvar="EDGEFED_BROKER_URL", help="Broker URL: mqtt://HOST:PORT.")],
    device_id: Annotated[str, typer.Option(envvar="EDGEFED_DEVICE_ID", help="This device's id (as registered).")],
    region: Annotated[str, typer.Option(envvar="EDGEFED_REGION", help="Region (site) this device belongs to.")],
    token: Annotated[
        str | None,
        typer.Option(envvar="EDGEFED_DEVICE_TOKEN", help="Device token issued by the hub.", show_default=False),
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
        typer.Option(
            envvar="EDGEFED_POLICY",
            help="Escalation policy: threshold (max probability), margin (top-1 minus top-2), entropy "
            "(1 - normalised entropy), budget, edge-only or cloud-only. --threshold applies to the first three.",
        ),
    ] = "threshold",
    budget: Annotated[
        float,
        typer.Option(
            envvar="EDGEFED_BUDGET",
            help="Budget policy: share of cases to escalate (0..1), calibrated on the bundle, kept on target live.",
        ),
    ] = 0.1,
    budget_score: Annotated[
        str,
        typer.Option(envvar="EDGEFED_BUDGET_SCORE", help="Budget policy ranks cases by: confidence, margin, entropy."),
    ] = "confidence",
    budget_window: Annotated[
        int,
        typer.Option(envvar="EDGEFED_BUDGET_WINDOW", help="Budget policy: recent cases the live rate is kept over."),
    ] = 1000,
    breaker_failures: Annotated[
        int,
        typer.Option(
            envvar="EDGEFED_BREAKER_FAILURES",
            help="Consecutive timed-out (or too slow) escalations that open the circuit breaker.",
        ),
    ] = 5,
    breaker_cooldown: Annotated[
        float,
        typer.Option(
            envvar="EDGEFED_BREAKER_COOLDOWN",
            help="Seconds the breaker stays open (answering at the edge, queueing) before it probes the hub.",
        ),
    ] = 10.0,
    breaker_latency_ms: Annotated[
        float | None,
        typer.Option(
            envvar="EDGEFED_BREAKER_LATENCY_MS",
            help="Cloud round trip above this counts as a failure for the breaker (default: only timeouts).",
            show_default=False,
        ),
    ] = None,
    redact: Annotated[
        str | None,
        typer.Option(
            envvar="EDGEFED_REDACT",
            help="Metadata redaction before anything leaves the site: FIELD:drop|hash|mask, comma-separated, "
            "e.g. operator:hash,serial:mask,badge:drop.",
            show_default=False,
        ),
    ] = None,
    redact_unlisted: Annotated[
        bool,
        typer.Option(envvar="EDGEFED_REDACT_UNLISTED", help="Drop metadata fields that no --redact rule names."),
    ] = False,
    learning_max: Annotated[
        int,
        typer.Option(envvar="EDGEFED_LEARNING_MAX", help="Cases kept in the local learning store (oldest dropped)."),
    ] = 50_000,
    feedback_cache: Annotated[
        float,
        typer.Option(
            envvar="EDGEFED_FEEDBACK_CACHE_MIB",
            help="MiB of recent inputs kept in memory for inspectors' feedback (at most 512 cases).",
        ),
    ] = 4.0,
    learning_retention_days: Annotated[
        float,
        typer.Option(envvar="EDGEFED_LEARNING_RETENTION_DAYS", help="Days a case stays in the learning store."),
    ] = 30.0,
    telemetry_interval: Annotated[
        float,
        typer.Option(envvar="EDGEFED_TELEMETRY_INTERVAL", help="Seconds between telemetry messages."),
    ] = 30.0,
    escalation_timeout: Annotated[
        float,
        typer.Option(
            envvar="EDGEFED_ESCALATION_TIMEOUT",
            help="Seconds to wait for the hub's answer before answering at the edge.",
        ),
    ] = 1.0,
    host: Annotated[str, typer.Option(envvar="EDGEFED_AGENT_HOST", help="Address of the local API.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="EDGEFED_AGENT_PORT", help="Port of the local API.")] = 8090,
    trusted_key: Annotated[
        Path | None,
        typer.Option(
            envvar="EDGEFED_TRUSTED_KEY",
            help="PEM public key(s) bundles must be signed with; default: the hub's keys, pinned on first use.",
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
    threads: Annotated[int, typer.Option(envvar="EDGEFED_AGENT_THREADS", help="onnxruntime intra-op threads.")] = 1,
    malloc_arenas: Annotated[
        int,
        typer.Option(
            envvar="EDGEFED_MALLOC_ARENAS",
            min=0,
            help="glibc malloc arenas for the agent process (fewer keep RSS steady); 0 = glibc's default. "
            "MALLOC_ARENA_MAX in the environment wins.",
        ),
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
            budget_rate=budget,
            budget_score=budget_score,
            budget_window=budget_window,
            breaker_failures=breaker_failures,
            breaker_cooldown_s=breaker_cooldown,
            breaker_latency_ms=breaker_latency_ms,
            redact=redact,
            redact_unlisted=redact_unlisted,
            learning_max_items=learning_max,
            feedback_cache_mib=feedback_cache,
            learning_retention_days=learning_retention_days,
            telemetry_interval_s=telemetry_interval,
        )
    except SettingsError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None

    from edge_agent.memory import limit_malloc_arenas

    limit_malloc_arenas(malloc_arenas)  # before the agent's threads start allocating
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


AGENT_URL_HELP = "Base URL of a running agent's local API."
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def collect_images(paths: list[Path]) -> list[Path]:
    """Files as given, and folders searched recursively for .png/.jpg/.jpeg, sorted, without repeats."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"{path} is neither a file nor a folder")
    return list(dict.fromkeys(found))


@agent_app.command()
def infer(
    paths: Annotated[list[Path], typer.Argument(help="Image files or folders (searched recursively for png/jpg).")],
    agent: Annotated[str, typer.Option(envvar="EDGEFED_AGENT_URL", help=AGENT_URL_HELP)] = "http://127.0.0.1:8090",
    out: Annotated[
        Path | None,
        typer.Option(
            envvar="EDGEFED_INFER_OUT", help="Write one JSON result per image to this file.", show_default=False
        ),
    ] = None,
    timeout: Annotated[
        float, typer.Option(envvar="EDGEFED_INFER_TIMEOUT", help="Seconds to wait for each answer.")
    ] = 30.0,
) -> None:
    """Send images to a running agent's /v1/infer with a progress bar; print counts by label and source."""
    import collections
    import json

    import httpx
    from tqdm import tqdm

    try:
        images = collect_images(paths)
    except FileNotFoundError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if not images:
        typer.echo("error: no .png/.jpg/.jpeg images found in the given paths", err=True)
        raise typer.Exit(2)
    by_label: collections.Counter[str] = collections.Counter()
    by_source: collections.Counter[str] = collections.Counter()
    failed = 0
    sink = out.open("w") if out is not None else None
    try:
        with httpx.Client(base_url=agent.rstrip("/"), timeout=timeout) as client:
            for path in tqdm(images, desc="infer", unit="img"):
                ctype = "image/png" if path.suffix.lower() == ".png" else "image/jpeg"
                try:
                    r = client.post("/v1/infer", content=path.read_bytes(), headers={"Content-Type": ctype})
                except httpx.HTTPError as exc:
                    typer.echo(f"error: cannot reach the agent at {agent}: {exc}", err=True)
                    raise typer.Exit(1) from None
                if r.status_code == 200:
                    body = r.json()
                    by_label[body["label_name"]] += 1
                    by_source[body["source"]] += 1
                    record = {"path": str(path), **body}
                else:
                    failed += 1
                    detail = (
                        r.json().get("detail")
                        if r.headers.get("content-type", "").startswith("application/json")
                        else r.text
                    )
                    record = {"path": str(path), "error": detail, "status": r.status_code}
                    tqdm.write(f"{path}: {r.status_code} {detail}")
                if sink is not None:
                    sink.write(json.dumps(record) + "\n")
    finally:
        if sink is not None:
            sink.close()
    typer.echo(f"{len(images) - failed} of {len(images)} images answered, {failed} refused")
    typer.echo("by label:  " + ", ".join(f"{k}={v}" for k, v in sorted(by_label.items())))
    typer.echo("by source: " + ", ".join(f"{k}={v}" for k, v in sorted(by_source.items())))
    if failed:
        raise typer.Exit(1)


@agent_app.command()
def rollback(
    agent: Annotated[str, typer.Option(envvar="EDGEFED_AGENT_URL", help=AGENT_URL_HELP)] = "http://127.0.0.1:8090",
) -> None:
    """Make a running agent serve its previous bundle again."""
    import httpx

    try:
        r = httpx.post(f"{agent.rstrip('/')}/v1/model/rollback", timeout=60.0)
    except httpx.HTTPError as exc:
        typer.echo(f"error: cannot reach the agent at {agent}: {exc}", err=True)
        raise typer.Exit(1) from None
    if r.status_code != 200:
        typer.echo(f"error: rollback refused ({r.status_code}): {r.json().get('detail', r.text)}", err=True)
        raise typer.Exit(1)
    body = r.json()
    typer.echo(f"now serving {body['model_name']}:{body['model_version']} (was {body['previous_version']})")
