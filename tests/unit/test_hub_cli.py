"""The hub's CLI module: cheap to import, and settings errors refused before anything starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import typer
from typer.testing import CliRunner

from cloud_hub.cli import hub_app

HEAVY = ("torch", "fastapi", "sqlalchemy", "uvicorn", "onnxruntime", "alembic")


def test_cli_module_imports_no_heavy_dependencies() -> None:
    code = (
        "import sys, cloud_hub.cli as c; "
        "assert callable(c.push) and callable(c.list_models) and c.hub_app and c.device_app; "
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == ""


def test_serve_refuses_bad_settings_with_one_line_and_exit_2(tmp_path: Path) -> None:
    app = typer.Typer()
    app.add_typer(hub_app, name="hub")
    runner = CliRunner()
    base = ["hub", "serve", "--data-dir", str(tmp_path / "hub")]
    cases = [
        (["--broker-url", "http://127.0.0.1:1883"], "broker URL 'http://127.0.0.1:1883' is invalid"),
        (["--device", "gpu"], "invalid setting device"),
        (["--signing-public-key", str(tmp_path / "missing.pub")], "missing.pub does not exist"),
    ]
    for extra, needle in cases:
        result = runner.invoke(app, base + extra, env={"EDGEFED_ADMIN_TOKEN": "t"})
        assert result.exit_code == 2, result.output
        assert "error: " in result.output and needle in result.output
    assert not (tmp_path / "hub" / "hub.db").exists()
