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
