"""The edge agent must run on an edge-only install: importing it must not import torch."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import edge_agent

# Every module of the package (found, not listed, so a new module cannot slip past), and what it needs.
AGENT_MODULES = [
    *(f"edge_agent.{m.name}" for m in pkgutil.iter_modules(edge_agent.__path__) if m.name != "__main__"),
    "shared.data.preprocess",
    # The root CLI assembles every part's commands; `edgefed agent run` goes through it.
    "shared.cli",
]


def test_every_module_is_checked() -> None:
    assert {"edge_agent.policy", "edge_agent.budget", "edge_agent.metrics", "edge_agent.telemetry"} <= set(
        AGENT_MODULES
    )


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_agent_imports_no_torch() -> None:
    modules = AGENT_MODULES
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in modules)
        + (
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision'))\n"
            "assert not heavy, heavy\n"
        )
    )
    r = _run(code)
    assert r.returncode == 0, r.stderr


def test_agent_imports_with_torch_unavailable() -> None:
    # sys.modules[name] = None makes any `import torch` raise ImportError, as on an edge-only install.
    modules = AGENT_MODULES
    r = _run("import sys\nsys.modules['torch'] = None\n" + "".join(f"import {m}\n" for m in modules))
    assert r.returncode == 0, r.stderr


def test_cli_module_imports_nothing_heavy() -> None:
    r = _run(
        "import sys\nimport edge_agent.cli\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'onnxruntime', 'fastapi', 'uvicorn', 'sqlalchemy', 'numpy'))\n"
        "assert not heavy, heavy\n"
    )
    assert r.returncode == 0, r.stderr


def test_agent_command_help_runs_without_torch() -> None:
    r = _run(
        "import sys\nsys.modules['torch'] = None\nsys.argv = ['edgefed', 'agent', 'run', '--help']\n"
        "from shared.cli import main\nmain()\n"
    )
    assert r.returncode == 0, r.stderr
    assert "--device-id" in r.stdout
