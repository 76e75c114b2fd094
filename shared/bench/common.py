"""What every benchmark shares: the machine it ran on, percentiles, target checks, JSON and a table.

A result is one JSON document: ``benchmark``, ``machine`` (CPU model and the SIMD flags that decide
INT8 speed, cores, memory), ``versions`` (of the packages that shape the numbers), ``settings``
(exactly what was asked for), ``measurements`` (raw summaries) and ``targets`` (each target with
the value measured in this run and pass/fail). Numbers come only from the run; nothing is assumed.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_OUT_DIR",
    "BenchResult",
    "Target",
    "cpu_load",
    "machine_info",
    "package_versions",
    "summarize",
    "print_result",
    "write_result",
]

DEFAULT_OUT_DIR = Path("bench-results")

_FLAGS_OF_INTEREST = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                      "avx_vnni", "amx_int8", "sse4_1", "sse4_2", "neon", "asimd", "asimddp")
_PACKAGES = ("edgefed", "numpy", "onnxruntime", "onnx", "torch", "paho-mqtt", "fastapi", "uvicorn", "httpx",
             "pydantic")


def machine_info(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, Any]:
    """CPU model, SIMD flags (AVX2/AVX-512/VNNI decide INT8 speed), core count and memory."""
    model: str | None = None
    flags: set[str] = set()
    try:
        for line in cpuinfo.read_text().splitlines():  # x86 says "model name"/"flags", ARM "Model"/"Features"
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Model") and model is None:
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    mem_total = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {
        "cpu_model": model or platform.processor() or "unknown",
        "cpu_flags": sorted(f for f in flags if f in _FLAGS_OF_INTEREST),
        "avx2": "avx2" in flags,
        "avx512": "avx512f" in flags,
        "vnni": bool(flags & {"avx512_vnni", "avx_vnni"}),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_bytes": mem_total,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_1m_at_start": cpu_load(),
    }


def cpu_load() -> float | None:
    """The 1-minute load average: other work on the box skews every latency measured here."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def package_versions(names: Iterable[str] = _PACKAGES) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def summarize(values: Sequence[float] | np.ndarray, digits: int = 4) -> dict[str, float | int]:
    """n, mean, min, p50, p90, p99, max of ``values`` (NaN fields when empty)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        nan = float("nan")
        return {"n": 0, "mean": nan, "min": nan, "p50": nan, "p90": nan, "p99": nan, "max": nan}
    q = np.percentile(arr, [50, 90, 99])
    return {
        "n": int(arr.size),
        "mean": round(float(arr.mean()), digits),
        "min": round(float(arr.min()), digits),
        "p50": round(float(q[0]), digits),
        "p90": round(float(q[1]), digits),
        "p99": round(float(q[2]), digits),
        "max": round(float(arr.max()), digits),
    }


@dataclass(frozen=True)
class Target:
    """One product target checked in this run: ``measured`` against ``limit`` with ``op``."""

    id: str
    what: str
    measured: float | None
    limit: float
    op: str = "<="  # "<=", ">=" or "abs<=" (|measured| <= limit)
    unit: str = ""
    note: str = ""

    @property
    def passed(self) -> bool | None:
        if self.measured is None or (isinstance(self.measured, float) and math.isnan(self.measured)):
            return None
        if self.op == "<=":
            return self.measured <= self.limit
        if self.op == ">=":
            return self.measured >= self.limit
        if self.op == "abs<=":
            return abs(self.measured) <= self.limit
        raise ValueError(f"unknown comparison {self.op!r}; use <=, >= or abs<=")

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


@dataclass
class BenchResult:
    """A benchmark's whole output; ``write_result`` stores it, ``print_result`` shows it."""

    benchmark: str
    settings: dict[str, Any]
    measurements: dict[str, Any] = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=machine_info)
    versions: dict[str, str | None] = field(default_factory=package_versions)
    started_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    _t0: float = field(default_factory=time.monotonic, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {
            "benchmark": self.benchmark,
            "started_at": self.started_at,
            "wall_s": round(time.monotonic() - self._t0, 1),
            "machine": {**self.machine, "load_average_1m_at_end": cpu_load()},
            "versions": self.versions,
            "settings": self.settings,
            "measurements": self.measurements,
            "targets": [t.as_dict() for t in self.targets],
            "notes": self.notes,
        }


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # JSON has no NaN; null says "not measured"
    return obj


def write_result(result: BenchResult, out: Path) -> Path:
    """Write ``result`` as indented JSON to ``out`` (parents created); return the path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_jsonable(result.as_dict()), indent=2) + "\n")
    return out


def _fmt(value: float | None, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.4g}{(' ' + unit) if unit else ''}"


def print_result(result: BenchResult, out: Path | None = None) -> None:
    """A table of target vs measured with pass/fail, then the notes."""
    m = result.machine
    print(f"\n=== edgefed bench {result.benchmark} ===")
    print(f"machine: {m.get('cpu_model')} | {m.get('usable_cores')} cores | flags {' '.join(m.get('cpu_flags', []))}"
          f" | load {m.get('load_average_1m_at_start')}")
    rows = [("id", "what", "target", "measured", "result")]
    for t in result.targets:
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[t.passed]
        rows.append((t.id, t.what, f"{t.op} {_fmt(t.limit, t.unit)}", _fmt(t.measured, t.unit), verdict))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for i, row in enumerate(rows):
        print("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
        if i == 0:
            print("  " + "  ".join("-" * w for w in widths))
    for note in result.notes:
        print(f"  note: {note}")
    if out is not None:
        print(f"  result: {out}")
    print()
