"""P7: the edge agent's footprint — install size without torch, time to ready, steady RSS.

- Install: a fresh venv, ``pip install '<repo>[edge]'``, site-packages summed without pip/setuptools.
- Ready: ``edgefed agent run`` (from that edge-only venv when it was built) against a real hub and
  broker, process start -> first ``/healthz`` 200; median of several starts (the first downloads
  the bundle, later ones find it on disk and still ask the hub).
- RSS: VmRSS of the agent process sampled every ``every`` requests over ``requests`` requests of
  real test inputs (about 15 % escalated to the hub, as the demo calibrates).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np

from shared.bench.common import BenchResult, Target, summarize
from shared.bench.models import BenchModels, EvalData

if TYPE_CHECKING:
    from shared.bench.agentload import AgentRig

__all__ = ["install_edge_venv", "site_packages_size", "run_p7"]

MiB = 1024 * 1024
_EXCLUDED = ("pip", "setuptools", "_distutils_hack", "pkg_resources", "distutils-precedence.pth", "wheel")


def install_edge_venv(repo: Path, venv: Path, timeout: float = 600, reuse: bool = False) -> float:
    """Create ``venv`` and install ``repo[edge]`` into it (non-editable); return seconds taken.

    pip builds a local directory in place; a copy of the sources keeps build/ out of the repository.
    With ``reuse`` and a venv already at ``venv``, only the project itself is reinstalled (its
    dependencies stay as they are), which takes seconds instead of a minute.
    """
    t0 = time.monotonic()
    src = venv.parent / "edgefed-src"
    if src.exists():
        shutil.rmtree(src)
    shutil.copytree(repo, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "bench-results", "demo-output", ".edgefed"))
    if reuse and (venv / "bin" / "python").is_file():
        cmd = [str(venv / "bin" / "pip"), "install", "-q", "--no-deps", "--force-reinstall", str(src)]
    else:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=timeout)
        cmd = [str(venv / "bin" / "pip"), "install", "-q", f"{src}[edge]"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"pip install of {repo}[edge] failed (exit {proc.returncode}); no size measured:\n"
                           f"{proc.stderr[-2000:]}")
    return time.monotonic() - t0


def _tree_bytes(path: Path) -> int:
    if path.is_file() or path.is_symlink():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def site_packages_size(venv: Path) -> dict[str, Any]:
    """Bytes in site-packages without pip/setuptools, the ten largest entries, and whether torch is there."""
    (site,) = list(venv.glob("lib/python*/site-packages"))
    sizes: dict[str, int] = {}
    for entry in site.iterdir():
        key = entry.name.split("-")[0].split(".")[0].lower() if entry.name.endswith(".dist-info") else entry.name
        if entry.name.startswith(_EXCLUDED) or key in _EXCLUDED:
            continue
        sizes[entry.name] = _tree_bytes(entry)
    top = sorted(sizes.items(), key=lambda kv: -kv[1])[:10]
    return {
        "bytes": sum(sizes.values()),
        "largest": {k: v for k, v in top},
        "torch_present": any(n.lower().startswith("torch") for n in sizes),
        "site_packages": str(site),
    }


def _ready_times(rig: AgentRig, python: Path | None, starts: int, timeout: float = 60) -> list[float]:
    from shared.bench.stack import edgefed_command

    out = []
    for i in range(starts):
        proc, url = rig.stack.agent(rig.device_id, rig.agent_args, command=edgefed_command(python))
        t0 = time.perf_counter()
        proc.start()
        deadline = time.monotonic() + timeout
        while True:
            if not proc.alive():
                raise RuntimeError(f"agent exited during start {i + 1}:\n{proc.log_tail()}")
            try:
                if httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"agent not ready within {timeout} s:\n{proc.log_tail()}")
            time.sleep(0.005)
        out.append(time.perf_counter() - t0)
        if i < starts - 1:
            proc.stop()
        else:
            rig.last_agent = (proc, url)
    return out


def run_p7(models: BenchModels, data: EvalData, *, repo: Path, skip_install: bool = False, starts: int = 3,
           requests: int = 10_000, every: int = 250, clients: int = 4, edge_venv: Path | None = None) -> BenchResult:
    """``edge_venv``: build the edge-only venv there (kept; a later run reinstalls only the project)."""
    from shared.bench.agentload import rss_bytes, run_requests, start_rig
    from shared.bench.stack import Stack

    result = BenchResult("edge/p7", {"repo": str(repo), "skip_install": skip_install, "starts": starts,
                                     "requests": requests, "sample_every": every, "clients": clients,
                                     "escalate_rate_target": 0.15,
                                     "edge_venv": str(edge_venv) if edge_venv else None})
    with tempfile.TemporaryDirectory(prefix="edgefed-bench-p7-") as tmp:
        venv_python = None
        if not skip_install:
            venv = Path(edge_venv) if edge_venv is not None else Path(tmp) / "edge-venv"
            secs = install_edge_venv(repo, venv, reuse=edge_venv is not None)
            size = site_packages_size(venv)
            result.measurements["install"] = {**size, "install_seconds": round(secs, 1)}
            result.targets.append(Target("P7", "edge-only site-packages (no pip/setuptools)",
                                         round(size["bytes"] / 1e6, 1), 220, "<=", "MB"))
            result.targets.append(Target("P7", "torch in edge-only install (1 = yes)", float(size["torch_present"]),
                                         0, "<=", ""))
            venv_python = venv / "bin" / "python"
        with Stack(Path(tmp) / "stack") as stack:
            rig = start_rig(stack, models, data.test_x)
            try:
                ready = _ready_times(rig, venv_python, starts)
                where = "edge-only venv" if venv_python else "development venv"
            except RuntimeError as exc:
                if venv_python is None:
                    raise
                result.notes.append(f"agent from the edge-only venv failed, measured from the dev venv: {exc}"[:600])
                ready, where = _ready_times(rig, None, starts), "development venv (edge-only failed)"
            assert rig.last_agent is not None
            proc, url = rig.last_agent
            pid = proc.pid
            samples: list[tuple[int, int]] = [(0, rss_bytes(pid))]
            failed, lat = run_requests(url, rig.bodies, requests, clients, every,
                                       lambda done: samples.append((done, rss_bytes(pid))))
            stats = httpx.get(f"{url}/v1/stats", timeout=5).json()
    done, rss = np.array([s[0] for s in samples]), np.array([s[1] for s in samples]) / MiB
    half = len(done) // 2
    slope = float(np.polyfit(done[half:], rss[half:], 1)[0] * 1000) if len(done) - half >= 2 else float("nan")
    result.measurements.update({
        "agent_from": where,
        "ready_s": [round(t, 3) for t in ready],
        "ready_s_median": round(float(np.median(ready)), 3),
        "rss_mib": {"start": round(float(rss[0]), 1), "max": round(float(rss.max()), 1),
                    "end": round(float(rss[-1]), 1), "slope_last_half_mib_per_1k_requests": round(slope, 3),
                    "samples": [[int(d), round(float(r), 1)] for d, r in zip(done, rss, strict=True)]},
        "requests_failed": failed,
        "request_latency_ms": summarize(lat),
        "agent_stats": stats,
        "agent_pid_rss_source": f"/proc/<pid>/status VmRSS (pid of the {where} agent)",
    })
    result.targets += [
        Target("P7", "agent ready (median of starts)", round(float(np.median(ready)), 3), 1.5, "<=", "s"),
        Target("P7", f"agent max RSS over {requests} requests", round(float(rss.max()), 1), 120, "<=", "MiB"),
        Target("P7", "failed requests during RSS run", float(failed), 0, "<=", ""),
    ]
    if os.getloadavg()[0] > 1.5:
        result.notes.append("the box was loaded during the run (load average > 1.5): ready time is pessimistic")
    return result
