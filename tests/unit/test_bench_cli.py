"""``edgefed bench``'s command line: no heavy imports at start-up, bad options refused before any work."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

from shared.bench.cli import bench_app


def test_importing_the_bench_cli_loads_no_torch_or_onnxruntime() -> None:
    code = ("import sys; import shared.bench.cli; "
            "print(sorted(m for m in ('torch', 'onnxruntime', 'fastapi', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_command_has_help() -> None:
    for cmd in ("edge", "cascade", "transport"):
        result = CliRunner().invoke(bench_app, [cmd, "--help"])
        assert result.exit_code == 0 and "--" in result.output


def test_unknown_section_is_refused_by_name(tmp_path) -> None:  # noqa: ANN001
    result = CliRunner().invoke(bench_app, ["edge", "--sections", "p1,p9", "--models", str(tmp_path / "m")])
    assert result.exit_code == 2
    assert "p9" in result.output
    assert not (tmp_path / "m").exists()  # refused before training anything


def test_unknown_budget_score_is_refused(tmp_path) -> None:  # noqa: ANN001
    result = CliRunner().invoke(bench_app, ["cascade", "--budget-score", "vibes", "--models", str(tmp_path / "m")])
    assert result.exit_code == 2 and "vibes" in result.output
    assert not (tmp_path / "m").exists()


def test_strategy_params_parse_per_strategy_with_json_values() -> None:
    from shared.bench.cli import _strategy_params

    got = _strategy_params(["fedadam.eta=0.001", "fedadam.tau=1e-9", "FedProx.proximal_mu=0.1", "fedadam.note=x"],
                           ("fedavg", "fedprox", "fedadam"))
    assert got == {"fedadam": {"eta": 0.001, "tau": 1e-9, "note": "x"}, "fedprox": {"proximal_mu": 0.1}}


def test_bad_strategy_param_is_refused_before_any_work(tmp_path) -> None:  # noqa: ANN001
    for item, named in (("fedadam", "STRATEGY.KEY=VALUE"), ("fedavg.eta=1", "'fedavg' is not among")):
        result = CliRunner().invoke(bench_app, ["fed", "--strategies", "fedadam", "--strategy-param", item,
                                                "--out-dir", str(tmp_path / "out")])
        assert result.exit_code == 2 and named in " ".join(result.output.split()), result.output
    assert not (tmp_path / "out").exists()
