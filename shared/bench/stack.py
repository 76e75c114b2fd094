"""Real processes for the benchmarks: mosquitto, ``edgefed hub serve`` and ``edgefed agent run``.

Everything binds 127.0.0.1 on free ports, runs as a ``ManagedProcess`` (its own process group) and
is stopped by ``Stack.close()``, which the benchmarks call in ``finally``.
"""

from __future__ import annotations

import secrets
import sys
import time
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path

from shared.broker import DevBroker
from shared.hub_client import HubClient
from shared.processes import ManagedProcess, free_port, wait_for_http

__all__ = ["Stack", "edgefed_command", "tiny_cloud_checkpoint"]


def edgefed_command(python: Path | None = None) -> list[str]:
    """The ``edgefed`` entry point of ``python``'s environment (default: this interpreter's)."""
    exe = Path(python or sys.executable).with_name("edgefed")
    return [str(exe)] if exe.exists() else [str(python or sys.executable), "-c", "from shared.cli import main; main()"]


def tiny_cloud_checkpoint(path: Path, task: str, side: int, *, seed: int = 0, arch: str = "cloud-resnet") -> Path:
    """A random-weight cloud network (``arch``, width 8) for 1×side×side inputs: transport cost without
    much model cost."""
    import torch

    from shared.bundle import InputSpec
    from shared.models import CheckpointMeta, build_model, save_checkpoint

    torch.manual_seed(seed)
    kwargs = {"in_channels": 1, "num_classes": 2, "width": 8}
    meta = CheckpointMeta(
        name=f"{task}-cloud", version="1", role="cloud", task=task, arch=arch, arch_kwargs=kwargs,
        labels=["a", "b"], input=InputSpec(shape=[1, 1, side, side]), created_at=datetime.now(UTC).isoformat(),
    )
    save_checkpoint(path, meta, build_model(arch, **kwargs).eval())
    return path


class Stack:
    """A broker, optionally a hub, and agents, started in order and stopped in reverse by ``close``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._exit = ExitStack()
        self.broker: DevBroker | None = None
        self.hub_url = ""
        self.admin_token = secrets.token_urlsafe(24)
        self.hub: ManagedProcess | None = None

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._exit.close()

    def start_broker(self) -> DevBroker:
        self.broker = DevBroker("127.0.0.1", free_port(), self.root / "broker").start()
        self._exit.callback(self.broker.stop)
        return self.broker

    def start_hub(self, public_keys: list[Path] = (), default_model: str | None = None,
                  timeout: float = 90.0) -> str:
        assert self.broker is not None, "start the broker first"
        port = free_port()
        argv = [*edgefed_command(), "hub", "serve", "--host", "127.0.0.1", "--port", str(port),
                "--data-dir", str(self.root / "hub"), "--broker-url", self.broker.url,
                "--admin-token", self.admin_token]
        for key in public_keys:
            argv += ["--signing-public-key", str(key)]
        if default_model:
            argv += ["--default-model", default_model]
        self.hub = ManagedProcess("hub", argv, self.root / "logs" / "hub.log").start()
        self._exit.callback(self.hub.stop)
        self.hub_url = f"http://127.0.0.1:{port}"
        self.wait(self.hub, f"{self.hub_url}/healthz", timeout)
        return self.hub_url

    def client(self) -> HubClient:
        return HubClient(self.hub_url, self.admin_token)

    def wait_hub_ready(self, timeout: float = 60.0) -> None:
        assert self.hub is not None
        self.wait(self.hub, f"{self.hub_url}/readyz", timeout)

    def agent(self, device_id: str, extra: list[str], *, command: list[str] | None = None,
              port: int | None = None) -> tuple[ManagedProcess, str]:
        """An agent process (not started): returns it and its base URL; ``close`` stops it."""
        assert self.broker is not None
        port = port or free_port()
        argv = [*(command or edgefed_command()), "agent", "run", "--hub", self.hub_url, "--broker", self.broker.url,
                "--device-id", device_id, "--region", "bench", "--host", "127.0.0.1", "--port", str(port),
                "--data-dir", str(self.root / "agents" / device_id), *extra]
        proc = ManagedProcess(f"agent-{device_id}", argv, self.root / "logs" / f"agent-{device_id}.log")
        self._exit.callback(proc.stop)
        return proc, f"http://127.0.0.1:{port}"

    @staticmethod
    def wait(proc: ManagedProcess, url: str, timeout: float) -> None:
        try:
            wait_for_http(url, timeout, alive=proc.alive)
        except (TimeoutError, RuntimeError) as exc:
            raise RuntimeError(f"{proc.name} not ready: {exc}\n--- {proc.log_path} ---\n{proc.log_tail()}") from None


def wait_until(predicate, timeout: float, interval: float = 0.01) -> float:  # noqa: ANN001
    """Poll ``predicate`` until true; return seconds waited, or raise TimeoutError."""
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"condition not met within {timeout:.0f} s")
        time.sleep(interval)
    return time.monotonic() - t0
