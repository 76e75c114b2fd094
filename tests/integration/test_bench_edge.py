"""The edge and cascade benchmarks in a tiny configuration (a 200-item slice, a few runs each):
real onnxruntime sessions, a real hub, broker and agent. They check the result's shape and sanity,
never the product targets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared.bench.common import write_result
from shared.bench.models import BenchModels, EvalData, load_eval_data, load_models

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[BenchModels, EvalData]:
    work = tmp_path_factory.mktemp("bench-models")
    models = load_models(work / "elpv", "elpv", epochs=1, resolution=32, limit=200)
    return models, load_eval_data(models.bundle.manifest)


def _json(result, tmp_path: Path) -> dict:  # noqa: ANN001
    return json.loads(write_result(result, tmp_path / "r.json").read_text())


def test_p1_ratios_come_from_measured_sizes_latencies_and_accuracies(tiny, tmp_path: Path) -> None:  # noqa: ANN001
    from shared.bench.edge import run_p1, sweep_configs

    data = _json(run_p1(*tiny, runs=20, warmup=3, sweep_runs=5), tmp_path)
    m = data["measurements"]
    assert m["size_bytes"]["int8"] < m["size_bytes"]["fp32"]
    assert m["ratios"]["size_int8_over_fp32"] == pytest.approx(m["size_bytes"]["int8"] / m["size_bytes"]["fp32"],
                                                               abs=1e-4)
    for k in ("int8", "fp32", "torch_cloud_fp32"):
        assert m["latency_ms"][k]["n"] == 20 and 0 < m["latency_ms"][k]["p50"] <= m["latency_ms"][k]["p90"]
    assert 0 <= m["accuracy"]["int8"] <= 1 and 0 <= m["accuracy"]["fp32"] <= 1
    assert len(m["session_sweep"]) == len(sweep_configs())
    # The profile is of the optimised graphs: the factory's INT8 model runs integer conv kernels, the FP32
    # one float convs, and the per-op totals add up to the per-node times.
    prof = m["op_profile_us"]
    assert "QLinearConv" in prof["int8"]["by_op"] and "Conv" not in prof["int8"]["by_op"]
    assert "Conv" in prof["fp32"]["by_op"] and "QLinearConv" not in prof["fp32"]["by_op"]
    for k in ("int8", "fp32"):
        assert prof[k]["total"] == pytest.approx(sum(prof[k]["by_op"].values()), abs=0.5)
        assert all(n["calls"] >= 50 and n["median_us"] >= 0 for n in prof[k]["nodes"])
    assert {t["what"] for t in data["targets"]} >= {"INT8/FP32 size", "accuracy drop INT8 vs FP32"}
    assert data["machine"]["cpu_flags"] and data["versions"]["onnxruntime"]


def test_p2_curve_spans_edge_only_to_cloud_only(tiny, tmp_path: Path) -> None:  # noqa: ANN001
    from shared.bench.cascade import BUDGET_RATES, run_p2

    plot = tmp_path / "cascade.png"
    data = _json(run_p2(*tiny, plot_path=plot), tmp_path)
    m = data["measurements"]
    for name in ("confidence", "margin", "entropy"):
        curve = m["policies"][name]["curve"]
        assert curve[0] == [0.0, m["edge_only_accuracy"]]
        assert m["policies"][name]["best_accuracy"] <= m["oracle_router_accuracy"]
    assert [b["target_rate"] for b in m["budget"]] == list(BUDGET_RATES)
    assert all(0 <= b["live_rate"] <= 1 for b in m["budget"])
    for b in m["budget"]:  # every stream order is reported, the first is the headline one
        assert len(b["live_rates_all_orders"]) == data["settings"]["budget_orders"] == 10
        assert b["live_rate"] == b["live_rates_all_orders"][0]
        assert abs(b["live_error_pt_worst"]) >= abs(b["live_error_pt"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_p8_swaps_while_serving_and_counts_every_request(tiny, tmp_path: Path) -> None:  # noqa: ANN001
    from shared.bench.swap import run_p8

    data = _json(run_p8(*tiny, swaps=1, clients=2, gap_s=0.5), tmp_path)
    m = data["measurements"]
    assert m["requests"] > 0 and m["failed"] == 0, m["errors"]
    assert len(m["versions_served"]) == 2 and len(m["swap_seconds"]) == 1


def test_p7_ready_time_and_rss_samples(tiny, tmp_path: Path) -> None:  # noqa: ANN001
    from shared.bench.footprint import run_p7

    repo = Path(__file__).resolve().parents[2]
    data = _json(run_p7(*tiny, repo=repo, skip_install=True, starts=1, requests=60, every=20, clients=2), tmp_path)
    m = data["measurements"]
    assert "install" not in m and len(m["ready_s"]) == 1 and 0 < m["ready_s"][0] < 60
    assert [s[0] for s in m["rss_mib"]["samples"]] == [0, 20, 40, 60]
    assert m["rss_mib"]["max"] >= m["rss_mib"]["start"] > 10
    assert m["requests_failed"] == 0
