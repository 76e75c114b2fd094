"""The root CLI: every command has --help, and a partial install gets a clear message."""

from __future__ import annotations

import subprocess
import sys

import pytest

COMMANDS = [
    [], ["broker"], ["demo"], ["hub", "serve"], ["hub", "worker"], ["agent", "run"], ["model", "train"],
    ["model", "compress"],
    ["model", "push"], ["model", "list"], ["device", "register"], ["device", "list"],
    ["hub", "token", "create"], ["hub", "token", "list"], ["hub", "token", "rotate"], ["hub", "token", "revoke"],
    ["bench", "edge"], ["bench", "cascade"], ["bench", "transport"], ["bench", "hub"], ["bench", "fed"],
    ["fed", "superlink"], ["fed", "supernode"],
    ["fed", "run"], ["fed", "status"], ["fed", "schedule", "create"], ["fed", "schedule", "list"],
    ["fed", "schedule", "delete"], ["fed", "schedule", "enable"], ["fed", "schedule", "disable"],
    ["rollout"], ["rollout", "start"], ["rollout", "status"], ["rollout", "list"], ["rollout", "promote"],
    ["rollout", "pause"], ["rollout", "resume"], ["rollout", "rollback"],
]


def _edgefed(*args: str, block: str | None = None) -> subprocess.CompletedProcess[str]:
    pre = f"import sys; sys.modules[{block!r}] = None; " if block else "import sys; "
    code = pre + f"sys.argv = ['edgefed', *{list(args)!r}]; from shared.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "root")
def test_every_command_has_help(command: list[str]) -> None:
    r = _edgefed(*command, "--help")
    assert r.returncode == 0, r.stderr
    assert "Usage" in r.stdout


def test_hub_command_on_an_edge_only_install_names_the_missing_extra() -> None:
    r = _edgefed("model", "train", "--limit", "5", block="torch")
    assert r.returncode == 2
    assert "needs the 'hub' extra" in r.stderr and "edgefed[hub]" in r.stderr
    assert "Traceback" not in r.stderr
