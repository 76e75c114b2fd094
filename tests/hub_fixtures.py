"""Fixtures and helpers for tests that need a real cloud hub: tiny models, and ``HubProcess``,
which runs ``edgefed hub serve`` as a child process on a free loopback port.

Load from a test module with ``pytest_plugins = ["tests.hub_fixtures"]``; then the fixtures
``hub_models`` (session: a tiny cloud checkpoint, a signed edge bundle and its key pair) and ``hub``
(a running hub on the ``broker`` fixture with both models pushed, ready per /readyz) are available,
and ``module_hub``, the same shared by all tests of a module.
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from shared.broker import DevBroker
from shared.bundle import InputSpec, Manifest, VerifiedBundle, generate_keypair, load_private_key, pack_bundle
from shared.bundle import write_bundle as _write_bundle
from shared.hub_client import HubClient
from shared.processes import ManagedProcess, free_port, wait_for_http

__all__ = [
    "HubModels",
    "HubProcess",
    "build_cloud_checkpoint",
    "build_edge_bundle",
    "export_edge_onnx",
    "hub",
    "hub_models",
    "make_hub_models",
    "module_hub",
    "start_hub_with_models",
]

TASK = "t"
LABELS = ["a", "b"]
INPUT_SHAPE = [1, 1, 32, 32]


# --- models --------------------------------------------------------------------------------------
def build_cloud_checkpoint(
    path: Path,
    *,
    name: str = "t-cloud",
    version: str = "1",
    task: str = TASK,
    labels: list[str] | None = None,
    parent_version: str | None = None,
    seed: int = 0,
) -> Path:
    """A random-weight CloudResNet (width 8) checkpoint for 1×32×32 inputs."""
    import torch

    from shared.models import CheckpointMeta, build_model, save_checkpoint

    labels = labels or list(LABELS)
    torch.manual_seed(seed)
    kwargs = {"in_channels": 1, "num_classes": len(labels), "width": 8}
    model = build_model("cloud-resnet", **kwargs).eval()
    meta = CheckpointMeta(
        name=name,
        version=version,
        parent_version=parent_version,
        role="cloud",
        task=task,
        arch="cloud-resnet",
        arch_kwargs=kwargs,
        labels=labels,
        input=InputSpec(shape=list(INPUT_SHAPE)),
        created_at=datetime.now(UTC).isoformat(),
    )
    save_checkpoint(path, meta, model)
    return path


def export_edge_onnx(path: Path, seed: int = 0) -> Path:
    """A random-weight EdgeCNN (width 8) exported to ONNX with a dynamic batch dimension."""
    import torch

    from shared.models import build_model

    torch.manual_seed(seed)
    model = build_model("edge-cnn", in_channels=1, num_classes=len(LABELS), width=8).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        model,
        (torch.zeros(INPUT_SHAPE),),
        str(path),
        dynamo=False,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}},
    )
    return path


def build_edge_bundle(
    out_dir: Path,
    onnx_path: Path,
    private_key_path: Path,
    *,
    name: str = "t-edge",
    version: str = "1",
    task: str = TASK,
    parent_version: str | None = None,
) -> VerifiedBundle:
    """A bundle directory signed with the key at ``private_key_path``."""
    manifest = Manifest(
        name=name,
        version=version,
        parent_version=parent_version,
        task=task,
        created_at=datetime.now(UTC).isoformat(),
        input=InputSpec(shape=list(INPUT_SHAPE)),
        labels=list(LABELS),
        model_sha256="0" * 64,
        model_size_bytes=0,
    )
    return _write_bundle(out_dir, onnx_path, manifest, load_private_key(private_key_path))


@dataclass(frozen=True)
class HubModels:
    """The tiny models every hub test pushes; ``make_*`` build more versions next to them."""

    root: Path
    private_key_path: Path
    public_key_path: Path
    onnx_path: Path
    checkpoint_path: Path
    bundle_dir: Path
    task: str = TASK
    cloud_name: str = "t-cloud"
    cloud_version: str = "1"
    edge_name: str = "t-edge"
    edge_version: str = "1"
    labels: tuple[str, ...] = tuple(LABELS)
    input_shape: tuple[int, ...] = tuple(INPUT_SHAPE)

    @property
    def bundle_archive(self) -> bytes:
        return pack_bundle(self.bundle_dir)

    def make_bundle(
        self,
        version: str,
        out_dir: Path,
        *,
        parent_version: str | None = None,
        name: str | None = None,
        task: str | None = None,
    ) -> VerifiedBundle:
        return build_edge_bundle(
            out_dir,
            self.onnx_path,
            self.private_key_path,
            name=name or self.edge_name,
            version=version,
            task=task or self.task,
            parent_version=parent_version,
        )

    def make_checkpoint(
        self, version: str, path: Path, *, name: str | None = None, task: str | None = None, seed: int = 1
    ) -> Path:
        return build_cloud_checkpoint(
            path, name=name or self.cloud_name, version=version, task=task or self.task, seed=seed
        )


def make_hub_models(root: Path) -> HubModels:
    root.mkdir(parents=True, exist_ok=True)
    private, public = root / "keys" / "signing.pem", root / "keys" / "signing.pub"
    generate_keypair(private, public)
    onnx_path = export_edge_onnx(root / "edge.onnx")
    bundle = build_edge_bundle(root / "bundle-1", onnx_path, private)
    ckpt = build_cloud_checkpoint(root / "cloud-1.pt")
    return HubModels(
        root=root,
        private_key_path=private,
        public_key_path=public,
        onnx_path=onnx_path,
        checkpoint_path=ckpt,
        bundle_dir=bundle.path,
    )


# --- the hub process -----------------------------------------------------------------------------
class HubProcess:
    """``edgefed hub serve`` in its own process group on 127.0.0.1:<free port>."""

    # The real entry point, as users run it; argv[0] is the interpreter of this test run.
    ENTRY = [sys.executable, "-c", "from shared.cli import main; main()"]

    def __init__(
        self,
        data_dir: Path,
        broker_url: str,
        *,
        admin_token: str | None = None,
        generate_admin_token: bool = False,
        public_keys: list[Path] | None = None,
        default_model: str = "t-edge",
        port: int | None = None,
        extra_args: list[str] | None = None,
    ) -> None:
        """Without ``admin_token`` a random one is passed, unless ``generate_admin_token`` lets the hub
        generate its own into ``<data_dir>/admin.token`` (then read back by ``admin_token``)."""
        self.data_dir = Path(data_dir)
        self.broker_url = broker_url
        self._admin_token = None if generate_admin_token else (admin_token or secrets.token_urlsafe(24))
        self.public_keys = list(public_keys or [])
        self.default_model = default_model
        self.port = port or free_port()
        self.extra_args = list(extra_args or [])
        self.process: ManagedProcess | None = None

    @property
    def admin_token(self) -> str:
        if self._admin_token is not None:
            return self._admin_token
        return (self.data_dir / "admin.token").read_text().strip()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def public_key_path(self) -> Path | None:
        return self.public_keys[0] if self.public_keys else None

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}.log"

    def argv(self) -> list[str]:
        argv = [*self.ENTRY, "hub", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        argv += ["--data-dir", str(self.data_dir), "--broker-url", self.broker_url]
        argv += ["--default-model", self.default_model]
        if self._admin_token is not None:
            argv += ["--admin-token", self._admin_token]
        for key in self.public_keys:
            argv += ["--signing-public-key", str(key)]
        return argv + self.extra_args

    def start(self, timeout: float = 60.0) -> HubProcess:
        """Start the hub and wait until /healthz answers (not until it is ready)."""
        # The hub's settings come from the arguments only, never from the developer's environment.
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFED_")}
        self.process = ManagedProcess("hub", self.argv(), self.log_path, env=env).start()
        try:
            wait_for_http(f"{self.base_url}/healthz", timeout, alive=self.process.alive)
        except (TimeoutError, RuntimeError) as exc:
            tail = self.process.log_tail(60)
            self.process.stop()
            raise RuntimeError(f"hub did not start: {exc}\n--- {self.log_path} ---\n{tail}") from None
        return self

    def stop(self) -> int | None:
        """SIGTERM the hub's process group; return its exit code."""
        if self.process is None:
            return None
        code = self.process.stop()
        self.process = None
        return code

    def restart(self, timeout: float = 60.0) -> HubProcess:
        """Stop and start again on the same port, data directory and arguments."""
        self.stop()
        return self.start(timeout)

    def wait_ready(self, timeout: float = 30.0) -> None:
        alive = self.process.alive if self.process else None
        try:
            wait_for_http(f"{self.base_url}/readyz", timeout, alive=alive)
        except (TimeoutError, RuntimeError) as exc:
            raise RuntimeError(f"hub not ready: {exc}\n--- {self.log_path} ---\n{self.log_tail()}") from None

    def client(self, token: str | None = None) -> HubClient:
        """A HubClient with ``token``, or the admin token when none is given."""
        return HubClient(self.base_url, token or self.admin_token)

    def http(self, token: str | None = None) -> httpx.Client:
        """A raw httpx client on the hub, with ``token`` as bearer (admin when None, none when '')."""
        token = self.admin_token if token is None else token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=30)

    def metrics_text(self) -> str:
        return httpx.get(f"{self.base_url}/metrics", timeout=10).text

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> HubProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def hub_models(tmp_path_factory: pytest.TempPathFactory) -> HubModels:
    """A tiny cloud checkpoint (t-cloud:1), a signed edge bundle (t-edge:1) and the signing key pair."""
    return make_hub_models(tmp_path_factory.mktemp("hub-models"))


def start_hub_with_models(
    data_dir: Path, broker_url: str, models: HubModels, extra_args: list[str] | None = None
) -> HubProcess:
    """Start a hub trusting ``models``' key, push its checkpoint and bundle, wait for /readyz.
    ``extra_args`` go to ``hub serve`` (e.g. ``["--db-url", url]``)."""
    proc = HubProcess(
        data_dir,
        broker_url,
        public_keys=[models.public_key_path],
        default_model=models.edge_name,
        extra_args=extra_args,
    )
    proc.start()
    try:
        with proc.client() as client:
            client.push_checkpoint(models.checkpoint_path)
            client.push_bundle(models.bundle_archive)
        proc.wait_ready()
    except BaseException:
        proc.stop()
        raise
    return proc


@pytest.fixture
def hub(broker: DevBroker, hub_models: HubModels, tmp_path: Path) -> Iterator[HubProcess]:
    """A running hub on the test's broker with t-cloud:1 and t-edge:1 pushed, ready per /readyz."""
    proc = start_hub_with_models(tmp_path / "hub", broker.url, hub_models)
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def module_hub(
    session_broker: DevBroker, hub_models: HubModels, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[HubProcess]:
    """Like ``hub`` but shared by a test module (on the session broker): tests must use their own
    device ids, versions and topics, and must not stop it."""
    proc = start_hub_with_models(
        tmp_path_factory.mktemp("module-hub") / "hub", session_broker.url, hub_models
    )
    try:
        yield proc
    finally:
        proc.stop()
