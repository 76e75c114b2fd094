"""The benchmark result format and the pure maths of the cascade curve."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from shared.bench.cascade import cascade_curve
from shared.bench.common import BenchResult, Target, machine_info, summarize, write_result


def test_summarize_percentiles_and_empty() -> None:
    s = summarize(list(range(1, 101)))
    assert s["n"] == 100 and s["min"] == 1 and s["max"] == 100
    assert s["p50"] == pytest.approx(50.5) and s["p99"] == pytest.approx(99.01)
    assert math.isnan(summarize([])["p50"])


@pytest.mark.parametrize(
    ("measured", "op", "limit", "passed"),
    [(0.2, "<=", 0.3, True), (0.4, "<=", 0.3, False), (5, ">=", 3, True), (-2.5, "abs<=", 2, False),
     (None, "<=", 1, None), (float("nan"), "<=", 1, None)],
)
def test_target_verdicts(measured: float | None, op: str, limit: float, passed: bool | None) -> None:
    assert Target("P0", "x", measured, limit, op).passed is passed


def test_machine_info_reads_flags_from_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu sse4_2 avx avx2 avx512f "
                       "avx512_vnni\n\nprocessor\t: 1\nmodel name\t: Test CPU 9000\nflags\t\t: fpu\n")
    info = machine_info(cpuinfo)
    assert info["cpu_model"] == "Test CPU 9000"
    assert info["avx2"] and info["avx512"] and info["vnni"]
    assert "fpu" not in info["cpu_flags"] and "avx512_vnni" in info["cpu_flags"]


def test_result_json_has_machine_versions_settings_and_verdicts(tmp_path: Path) -> None:
    r = BenchResult("unit", {"runs": 3}, {"latency_ms": summarize([1.0, 2.0])},
                    [Target("P1", "ratio", 0.5, 0.6), Target("P1", "nan", float("nan"), 1.0)])
    data = json.loads(write_result(r, tmp_path / "sub" / "r.json").read_text())
    assert data["benchmark"] == "unit" and data["settings"] == {"runs": 3}
    assert {"cpu_model", "cpu_flags", "avx2", "vnni", "logical_cores"} <= set(data["machine"])
    assert data["versions"]["numpy"] == np.__version__
    assert [t["passed"] for t in data["targets"]] == [True, None]
    assert data["targets"][1]["measured"] is None  # NaN is written as null, never as invalid JSON


def test_cascade_curve_escalates_least_certain_first() -> None:
    scores = np.array([0.9, 0.1, 0.5, 0.7])
    edge_right = np.array([True, False, False, True])
    cloud_right = np.array([True, True, True, False])
    rates, acc = cascade_curve(scores, edge_right, cloud_right)
    assert list(rates) == [0, 0.25, 0.5, 0.75, 1.0]
    # k=0: edge only (2/4); k=1 fixes case 1; k=2 fixes case 2; k=3 breaks case 3; k=4: cloud only (3/4).
    assert list(acc) == [0.5, 0.75, 1.0, 0.75, 0.75]
