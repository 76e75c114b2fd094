"""``edgefed hub serve``, ``edgefed device ...`` and ``edgefed model push|list``.

Only typer and the standard library at import time: torch, fastapi, sqlalchemy and uvicorn load
inside the commands, so importing this module (as ``shared.cli`` does) stays cheap.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
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

# Options that `hub serve` and `hub worker` share.
DataDirOpt = Annotated[
    Path, typer.Option(envvar="EDGEFED_HUB_DATA_DIR", help="Database, artifacts, keys and admin token.")
]
DbUrlOpt = Annotated[
    str | None,
    typer.Option(
        envvar="EDGEFED_DB_URL",
        help="SQLAlchemy URL; default sqlite:///<data-dir>/hub.db.",
        show_default=False,
    ),
]
BrokerUrlOpt = Annotated[
    str, typer.Option(envvar="EDGEFED_BROKER_URL", help="Broker URL: mqtt://HOST:PORT or mqtts://.")
]
HubDeviceOpt = Annotated[
    str, typer.Option(envvar="EDGEFED_HUB_DEVICE", help="Where the cloud model runs: cpu or cuda.")
]
MaxBatchOpt = Annotated[
    int, typer.Option(envvar="EDGEFED_MAX_BATCH_SIZE", help="Most samples per inference batch.")
]
MaxQueueDelayOpt = Annotated[
    float,
    typer.Option(
        envvar="EDGEFED_MAX_QUEUE_DELAY_MS",
        help="Longest a request waits (ms) for others to share its inference batch.",
    ),
]
RequestDeadlineOpt = Annotated[
    float,
    typer.Option(
        envvar="EDGEFED_REQUEST_DEADLINE_MS",
        help="A request whose batch has not started within this (ms) is answered deadline_exceeded "
        "without being computed; 0: no deadline.",
    ),
]
MaxQueueOpt = Annotated[
    int,
    typer.Option(
        envvar="EDGEFED_MAX_QUEUE", help="Requests waiting for inference before new ones are refused (queue_full)."
    ),
]
CpuRuntimeOpt = Annotated[
    str,
    typer.Option(
        envvar="EDGEFED_HUB_CPU_RUNTIME",
        help="What runs a cloud model on the CPU: onnxruntime (the same network exported in memory, used "
        "only if its probabilities match PyTorch's; else PyTorch) or torch.",
    ),
]
CpuThreadsOpt = Annotated[
    int,
    typer.Option(envvar="EDGEFED_HUB_CPU_THREADS", help="Threads per CPU model; 0: half the usable cores."),
]
WarmupOpt = Annotated[
    int,
    typer.Option(
        envvar="EDGEFED_WARMUP_BATCHES",
        help="Warm-up batches per batch size class before a cloud model goes live (and /readyz turns ready).",
    ),
]


@hub_app.callback()
def _hub() -> None:
    """The cloud hub: REST API, MQTT gateway and full-model inference."""


@hub_app.command()
def serve(
    host: Annotated[str, typer.Option(envvar="EDGEFED_HUB_HOST", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="EDGEFED_HUB_PORT", help="HTTP port.")] = 8080,
    data_dir: DataDirOpt = Path(".edgefed/hub"),
    db_url: DbUrlOpt = None,
    broker_url: BrokerUrlOpt = "mqtt://127.0.0.1:1883",
    device: HubDeviceOpt = "cpu",
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
    max_batch_size: MaxBatchOpt = 32,
    max_queue_delay_ms: MaxQueueDelayOpt = 2.0,
    request_deadline_ms: RequestDeadlineOpt = 5000.0,
    max_queue: MaxQueueOpt = 10_000,
    warmup_batches: WarmupOpt = 2,
    cpu_runtime: CpuRuntimeOpt = "onnxruntime",
    cpu_threads: CpuThreadsOpt = 0,
    rollout_tick: Annotated[
        float,
        typer.Option(
            envvar="EDGEFED_ROLLOUT_TICK_S",
            help="Seconds between rollout controller ticks (gates judged, waves promoted or rolled back).",
        ),
    ] = 2.0,
    superlink: Annotated[
        str, typer.Option(envvar="EDGEFED_SUPERLINK", help="SuperLink Control API (HOST:PORT) for federation runs.")
    ] = "127.0.0.1:9093",
    signing_key: Annotated[
        Path | None,
        typer.Option(
            envvar="EDGEFED_SIGNING_KEY",
            help="Ed25519 key signing federated edge bundles; default <data-dir>/keys/hub-signing.pem.",
            show_default=False,
        ),
    ] = None,
    fed_poll: Annotated[
        float, typer.Option(envvar="EDGEFED_FED_POLL_S", help="Seconds between polls of a running federation run.")
    ] = 2.0,
    fed_gate_margin: Annotated[
        float,
        typer.Option(
            envvar="EDGEFED_FED_GATE_MIN_IMPROVEMENT_PT",
            help="Points a federated model must gain over its parent on the reference set to be registered.",
        ),
    ] = 0.0,
    store_payloads: Annotated[
        bool | None,
        typer.Option(
            "--store-payloads/--no-store-payloads",
            envvar="EDGEFED_STORE_PAYLOADS",
            help="Store raw escalation payloads (default: keep the setting an admin made through the API; "
            "off if none).",
            show_default=False,
        ),
    ] = None,
    payload_retention_s: Annotated[
        float | None,
        typer.Option(
            envvar="EDGEFED_PAYLOAD_RETENTION_S",
            help="Delete stored payloads older than this many seconds (default 604800).",
            show_default=False,
        ),
    ] = None,
    payload_max_rows: Annotated[
        int | None,
        typer.Option(
            envvar="EDGEFED_PAYLOAD_MAX_ROWS",
            help="Keep at most this many stored payloads, newest first (default 10000).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Run the hub until SIGTERM or Ctrl-C, then stop the gateway, inference and database cleanly."""
    _setup_logging()
    settings = _settings(
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
        max_queue_delay_ms=max_queue_delay_ms,
        request_deadline_ms=request_deadline_ms,
        max_queue=max_queue,
        warmup_batches=warmup_batches,
        cpu_runtime=cpu_runtime,
        cpu_threads=cpu_threads,
        rollout_tick_s=rollout_tick,
        superlink_address=superlink,
        signing_key_file=signing_key,
        fed_poll_s=fed_poll,
        fed_gate_min_improvement_pt=fed_gate_margin,
        store_payloads=store_payloads,
        payload_retention_s=payload_retention_s,
        payload_max_rows=payload_max_rows,
    )
    raise typer.Exit(_serve(settings))


@hub_app.command()
def worker(
    host: Annotated[
        str, typer.Option(envvar="EDGEFED_WORKER_HOST", help="Address of the health/metrics endpoint.")
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(envvar="EDGEFED_WORKER_PORT", help="Port of /healthz, /readyz and /metrics.")
    ] = 8090,
    data_dir: DataDirOpt = Path(".edgefed/hub"),
    db_url: DbUrlOpt = None,
    broker_url: BrokerUrlOpt = "mqtt://127.0.0.1:1883",
    device: HubDeviceOpt = "cpu",
    worker_id: Annotated[
        str | None,
        typer.Option(
            envvar="EDGEFED_WORKER_ID",
            help="Name in answers, logs and the MQTT client id; default hub-<host>-<pid>.",
            show_default=False,
        ),
    ] = None,
    max_batch_size: MaxBatchOpt = 32,
    max_queue_delay_ms: MaxQueueDelayOpt = 2.0,
    request_deadline_ms: RequestDeadlineOpt = 5000.0,
    max_queue: MaxQueueOpt = 10_000,
    warmup_batches: WarmupOpt = 2,
    cpu_runtime: CpuRuntimeOpt = "onnxruntime",
    cpu_threads: CpuThreadsOpt = 0,
    db_wait: Annotated[
        float,
        typer.Option(
            envvar="EDGEFED_DB_WAIT_S", help="Seconds to wait for `hub serve` to migrate the database."
        ),
    ] = 120.0,
) -> None:
    """Answer escalations on the shared subscription, beside one `hub serve` (which owns the REST API
    and the database migrations) on the same database and data directory. Stops cleanly on SIGTERM."""
    _setup_logging()
    settings = _settings(
        host=host,
        port=port,
        data_dir=data_dir,
        db_url=db_url,
        broker_url=broker_url,
        device=device,
        max_batch_size=max_batch_size,
        max_queue_delay_ms=max_queue_delay_ms,
        request_deadline_ms=request_deadline_ms,
        max_queue=max_queue,
        warmup_batches=warmup_batches,
        cpu_runtime=cpu_runtime,
        cpu_threads=cpu_threads,
        db_wait_s=db_wait,
        **({"worker_id": worker_id} if worker_id else {}),
    )
    raise typer.Exit(_serve(settings, role="worker"))


def _setup_logging() -> None:
    # The root command configured logging already (text or JSON); this covers direct calls of hub_app.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)  # one line per plugin at import


def _settings(**values: object) -> HubSettings:
    from pydantic import ValidationError

    from cloud_hub.config import HubSettings

    try:
        return HubSettings(**values)
    except ValidationError as exc:
        err = exc.errors()[0]
        _fail(f"invalid setting {'.'.join(map(str, err['loc']))}: {err['msg']}", code=2)


def _serve(settings: HubSettings, role: str = "api") -> int:
    from shared.mqtt import parse_broker_url

    try:
        parse_broker_url(settings.broker_url)
    except ValueError as exc:
        _fail(str(exc), code=2)

    import uvicorn

    from cloud_hub.main import create_app, create_worker_app
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
            create_app(settings) if role == "api" else create_worker_app(settings),
            host=settings.host,
            port=settings.port,
            log_level="info",
            log_config=None,  # uvicorn's lines go through the root logger: same format (text or JSON)
            access_log=False,
            lifespan="on",
        )
    )
    # uvicorn handles SIGTERM/SIGINT: it stops accepting, then runs the lifespan shutdown, and then
    # re-raises the signal. By then the hub has stopped cleanly, so that re-raised signal exits 0
    # (a supervisor tells a clean stop from a crash by the exit status).
    def _stopped(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(0 if server.started else 1)

    signal.signal(signal.SIGTERM, _stopped)
    signal.signal(signal.SIGINT, _stopped)
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
def list_devices(
    hub: HubUrl = DEFAULT_HUB,
    token: AdminToken = None,
    region: Annotated[
        str | None,
        typer.Option(envvar="EDGEFED_DEVICE_REGION", help="Only devices of this region.", show_default=False),
    ] = None,
    online: Annotated[
        bool | None,
        typer.Option(
            "--online/--offline",
            envvar="EDGEFED_DEVICE_ONLINE",
            help="Only online or only offline devices.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Print the fleet: region, model, assigned and running versions, online state."""
    with _client(hub, token) as client:
        devices = _call(lambda: client.list_devices(limit=1000, region=region, online=online))
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
