"""A real agent serving the reference bundle behind a real hub and broker, and HTTP load against it.

Shared by P7 (ready time, steady RSS) and P8 (model swap under load).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from shared.bench.models import BenchModels
from shared.bench.stack import Stack
from shared.processes import ManagedProcess

__all__ = ["AgentRig", "Hammer", "rss_bytes", "run_requests", "start_rig"]

TENSOR = {"Content-Type": "application/x-edgefed-tensor"}


def rss_bytes(pid: int) -> int:
    """VmRSS of ``pid`` from /proc (bytes)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/{pid}/status has no VmRSS")


@dataclass
class AgentRig:
    stack: Stack
    device_id: str
    agent_args: list[str]
    bodies: list[bytes]
    last_agent: tuple[ManagedProcess, str] | None = None  # the agent left running by a benchmark


def start_rig(stack: Stack, models: BenchModels, inputs: np.ndarray, *, escalate_rate: float = 0.15,
              device_id: str = "bench-edge") -> AgentRig:
    """Broker and hub with the reference models pushed and a device registered (no agent started yet)."""
    from shared.bundle import pack_bundle
    from shared.codec import encode_frame

    stack.start_broker()
    stack.start_hub([models.public_key], default_model=models.bundle.manifest.name)
    with stack.client() as client:
        client.push_checkpoint(models.cloud_checkpoint)
        client.push_bundle(pack_bundle(models.bundle.path))
        token = client.register_device(device_id, "bench", models.bundle.manifest.name).token
    stack.wait_hub_ready()
    q = models.bundle.manifest.metrics.calibration_confidence_quantiles or []
    threshold = float(q[round(escalate_rate * (len(q) - 1))]) if q else 0.8
    args = ["--token", token, "--trusted-key", str(models.public_key), "--threshold", f"{threshold:.6f}"]
    bodies = [encode_frame(0, {}, np.ascontiguousarray(inputs[i : i + 1])) for i in range(min(len(inputs), 512))]
    return AgentRig(stack, device_id, args, bodies)


@dataclass
class Hammer:
    """``clients`` threads posting /v1/infer in a loop until ``stop``; every request is recorded."""

    url: str
    bodies: list[bytes]
    clients: int = 4
    timeout: float = 10.0
    records: list[tuple[float, float, int, str, str]] = field(default_factory=list)  # t0, t1, status, version, err
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Hammer:
        for c in range(self.clients):
            t = threading.Thread(target=self._loop, args=(c,), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout + 5)

    def _loop(self, c: int) -> None:
        i = c
        with httpx.Client(timeout=self.timeout) as http:
            while not self._stop.is_set():
                body = self.bodies[i % len(self.bodies)]
                i += self.clients
                t0 = time.perf_counter()
                status, version, err = 0, "", ""
                try:
                    r = http.post(f"{self.url}/v1/infer", content=body, headers=TENSOR)
                    status = r.status_code
                    if status == 200:
                        version = r.json().get("model_version", "")
                    else:
                        err = r.text[:200]
                except httpx.HTTPError as exc:
                    err = f"{type(exc).__name__}: {exc}"
                with self._lock:
                    self.records.append((t0, time.perf_counter(), status, version, err))


def run_requests(url: str, bodies: list[bytes], n: int, clients: int, every: int,
                 on_chunk: Callable[[int], None]) -> tuple[int, list[float]]:
    """``n`` requests by ``clients`` threads in chunks of ``every``; ``on_chunk(done)`` after each chunk.

    Returns (failed, latencies in ms)."""
    failed, lat = 0, []
    local = threading.local()

    def one(i: int) -> tuple[bool, float]:
        if not hasattr(local, "http"):
            local.http = httpx.Client(timeout=30)
        t0 = time.perf_counter()
        try:
            ok = local.http.post(f"{url}/v1/infer", content=bodies[i % len(bodies)], headers=TENSOR).status_code == 200
        except httpx.HTTPError:
            ok = False
        return ok, (time.perf_counter() - t0) * 1000.0

    with ThreadPoolExecutor(max_workers=clients) as pool:
        for start in range(0, n, every):
            for ok, ms in pool.map(one, range(start, min(n, start + every))):
                failed += not ok
                lat.append(ms)
            on_chunk(min(n, start + every))
    return failed, lat
