"""``edgefed hub serve``, ``edgefed device ...`` and ``edgefed model push|list``.

Only typer and the standard library at import time: torch, fastapi, sqlalchemy and uvicorn load
inside the commands, so importing this module (as ``shared.cli`` does) stays cheap.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn, TypeVar

import typer

if TYPE_CHECKING:
    from cloud_hub.config import HubSettings
    from shared.hub_client import HubClient

__all__ = ["hub_app", "device_app", "push", "list_models"]

log = logging.getLogger(__name__)
T = TypeVar("T")

hub_app = typer.Typer(help="Run the cloud hub.", no_args_is_help=True)
device_app = typer.Typer(help="Register and list edge devices.", no_args_is_help=True)

HubUrl = Annotated[str, typer.Option("--hub", envvar="EDGEFED_HUB_URL", help="Hub base URL.")]
AdminToken = Annotated[
    str | None,
    typer.Option("--token", envvar="EDGEFED_ADMIN_TOKEN", help="Admin bearer token.", show_default=False),
]
DEFAULT_HUB = "http://127.0.0.1:8080"


@hub_app.callback()
def _hub() -> None:
    """The cloud hub: REST API, MQTT gateway and full-model inference."""


@hub_app.command()
def serve(
    host: Annotated[str, typer.Option(envvar="EDGEFED_HUB_HOST", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="EDGEFED_HUB_PORT", help="HTTP port.")] = 8080,
    data_dir: Annotated[
        Path, typer.Option(envvar="EDGEFED_HUB_DATA_DIR", help="Database, artifacts, keys and admin token.")
    ] = Path(".edgefed/hub"),
    db_url: Annotated[
        str | None,
        typer.Option(
            envvar="EDGEFED_DB_URL",
            help="SQLAlchemy URL; default sqlite:///<data-dir>/hub.db.",
            show_default=False,
        ),
    ] = None,
    broker_url: Annotated[
        str, typer.Option(envvar="EDGEFED_BROKER_URL", help="Broker URL: mqtt://HOST:PORT or mqtts://.")
    ] = "mqtt://127.0.0.1:1883",
    device: Annotated[
        str, typer.Option(envvar="EDGEFED_HUB_DEVICE", help="Where the cloud model runs: cpu or cuda.")
    ] = "cpu",
    admin_token: Annotated[
        str | None,
        typer.Option(
            envvar="EDGEFED_ADMIN_TOKEN",
            help="Admin token; default: generated into <data-dir>/admin.token on first start.",
            show_default=False,
        ),
    ] = None,
    signing_public_key: Annotated[
        list[str] | None,
        typer.Option(
            envvar="EDGEFED_SIGNING_PUBLIC_KEY",
            help="PEM Ed25519 public key trusted for bundles "
            "(repeatable or comma-separated); <data-dir>/keys/*.pub are trusted too.",
            show_default=False,
        ),
    ] = None,
    default_model: Annotated[
        str,
        typer.Option(envvar="EDGEFED_DEFAULT_MODEL", help="Edge model of devices registered without one."),
    ] = "elpv-edge",
    max_batch_size: Annotated[
        int, typer.Option(envvar="EDGEFED_MAX_BATCH_SIZE", help="Most samples per inference batch.")
    ] = 32,
) -> None:
    """Run the hub until SIGTERM or Ctrl-C, then stop the gateway, inference and database cleanly."""
    from pydantic import ValidationError

    from cloud_hub.config import HubSettings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)  # one line per plugin at import
    try:
        settings = HubSettings(
            host=host,
            port=port,
            data_dir=data_dir,
            db_url=db_url,
            broker_url=broker_url,
            device=device,
            admin_token=admin_token,
            signing_public_keys=signing_public_key or [],
            default_model_name=default_model,
            max_batch_size=max_batch_size,
        )
    except ValidationError as exc:
        err = exc.errors()[0]
        _fail(f"invalid setting {'.'.join(map(str, err['loc']))}: {err['msg']}", code=2)
    raise typer.Exit(_serve(settings))


def _serve(settings: HubSettings) -> int:
    from shared.mqtt import parse_broker_url

    try:
        parse_broker_url(settings.broker_url)
    except ValueError as exc:
        _fail(str(exc), code=2)

    import uvicorn

    from cloud_hub.main import create_app
    from cloud_hub.registry.keys import KeyConfigError, TrustedKeys

    try:
        TrustedKeys(tuple(settings.signing_public_keys), settings.keys_dir).check()
    except KeyConfigError as exc:
        _fail(str(exc), code=2)
    if settings.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            _fail("--device cuda was given but torch sees no CUDA device; use --device cpu", code=2)
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings),
            host=settings.host,
            port=settings.port,
            log_level="info",
            access_log=False,
            lifespan="on",
        )
    )
    # uvicorn handles SIGTERM/SIGINT: it stops accepting, then runs the lifespan shutdown.
    server.run()
    return 0 if server.started else 1


# --- device -----------------------------------------------------------------------------------
@device_app.command("register")
def register(
    device_id: Annotated[str, typer.Argument(help="The device's id: letters, digits, '.', '_' or '-'.")],
    region: Annotated[str, typer.Option(envvar="EDGEFED_REGION", help="Region (site) of the device.")] = "",
    model: Annotated[
        str | None,
        typer.Option(
            envvar="EDGEFED_MODEL",
            help="Edge model the device runs; default: the hub's default.",
            show_default=False,
        ),
    ] = None,
    hub: HubUrl = DEFAULT_HUB,
    token: AdminToken = None,
) -> None:
    """Register a device and print its token (shown only this once)."""
    with _client(hub, token) as client:
        created = _call(lambda: client.register_device(device_id, region, model))
    typer.echo(created.token)


@device_app.command("list")
def list_devices(hub: HubUrl = DEFAULT_HUB, token: AdminToken = None) -> None:
    """Print the fleet: region, model, assigned and running versions, online state."""
    with _client(hub, token) as client:
        devices = _call(client.list_devices)
    rows = [
        [
            d.device_id,
            d.region,
            d.model_name or "",
            d.assigned_version or "-",
            d.running_version or "-",
            "online" if d.online else "offline",
            str(d.escalations),
            d.last_seen.isoformat(timespec="seconds") if d.last_seen else "-",
        ]
        for d in devices.data
    ]
    _table(["DEVICE", "REGION", "MODEL", "ASSIGNED", "RUNNING", "STATE", "ESCALATIONS", "LAST SEEN"], rows)


# --- model ------------------------------------------------------------------------------------
def push(
    path: Annotated[
        Path, typer.Argument(help="A bundle directory, a bundle .tar.gz, or a cloud .pt checkpoint.")
    ],
    hub: HubUrl = DEFAULT_HUB,
    token: AdminToken = None,
) -> None:
    """Push a signed edge bundle or a cloud checkpoint to the hub's registry."""
    from shared.bundle import BundleError, pack_bundle

    if not path.exists():
        _fail(f"{path} does not exist")
    with _client(hub, token) as client:
        if path.is_dir():
            try:
                archive = pack_bundle(path)
            except (BundleError, OSError) as exc:
                _fail(f"{path} is not a bundle directory: {exc}")
            version = _call(lambda: client.push_bundle(archive))
        elif path.name.endswith((".tar.gz", ".tgz")):
            version = _call(lambda: client.push_bundle(path.read_bytes()))
        elif path.suffix in (".pt", ".pth"):
            version = _call(lambda: client.push_checkpoint(path))
        else:
            _fail(f"{path}: expected a bundle directory, a .tar.gz bundle or a .pt checkpoint")
    typer.echo(
        f"pushed {version.name}:{version.version} ({version.kind}, task {version.task}, "
        f"sha256 {version.sha256[:12]}, {version.size_bytes} bytes)"
    )


def list_models(hub: HubUrl = DEFAULT_HUB, token: AdminToken = None) -> None:
    """Print every model and its versions, newest first."""
    with _client(hub, token) as client:
        models = _call(client.list_models)
        rows = []
        for m in models.data:
            for v in _call(lambda name=m.name: client.list_versions(name)).data:
                rows.append(
                    [
                        m.name,
                        m.kind,
                        m.task,
                        v.version,
                        v.parent_version or "-",
                        str(v.size_bytes),
                        v.created_at.isoformat(timespec="seconds"),
                    ]
                )
    if not rows:
        typer.echo("no models registered")
        return
    _table(["MODEL", "KIND", "TASK", "VERSION", "PARENT", "BYTES", "CREATED"], rows)


# --- helpers ----------------------------------------------------------------------------------
@contextmanager
def _client(hub: str, token: str | None) -> Iterator[HubClient]:
    from shared.hub_client import HubClient

    with HubClient(hub, token) as client:
        yield client


def _call(fn: Callable[[], T]) -> T:
    from shared.hub_client import HubError

    try:
        return fn()
    except HubError as exc:
        _fail(str(exc))


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]
    for row in [header, *rows]:
        typer.echo("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)).rstrip())
