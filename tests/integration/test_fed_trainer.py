"""The region's long-lived trainer process (federation.trainer): real processes, a real Unix socket, the
ClientApp's real handlers, and `edgefed fed supernode` taking the trainer down with Flower."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from multiprocessing.connection import Client
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from federation.client_app import evaluate as client_evaluate
from federation.client_app import train as client_train
from federation.processes import alive_pids, descendants
from federation.records import from_record, to_record
from federation.trainer import TrainerError, key_path, request, trainer_argv, wait_ready
from shared.processes import ManagedProcess, free_port
from tests.fed_fixtures import make_learning_store
from tests.hub_fixtures import TASK

KW = {"in_channels": 1, "num_classes": 2, "width": 8}
CFG = {"arch": "edge-cnn", "arch-kwargs": json.dumps(KW), "input-chw": "[1, 32, 32]", "task": TASK, "num-classes": 2,
       "local-epochs": 1, "lr": 3e-3, "batch-size": 8, "soft-weight": 0.5, "seed": 0}


def _weights() -> dict:
    import torch

    from federation.training import state_to_arrays
    from shared.models import build_model

    torch.manual_seed(0)
    return state_to_arrays(build_model("edge-cnn", **KW))


@pytest.fixture(scope="module")
def trainer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, ManagedProcess]]:
    root = tmp_path_factory.mktemp("trainer")
    data = make_learning_store(root / "data", 16, seed=5)
    sock = Path("/tmp") / f"edgefed-test-tr-{os.getpid()}" / "t.sock"  # short: Unix socket path limit
    proc = ManagedProcess("trainer", trainer_argv(sock, data), root / "trainer.log").start()
    try:
        wait_ready(sock, 120, alive=proc.alive)
        yield sock, data, proc
    finally:
        proc.stop()
        assert not sock.exists() and not key_path(sock).exists()
        sock.parent.rmdir()


def test_trainer_trains_evaluates_and_survives_a_failed_task(trainer) -> None:
    sock, _data, proc = trainer
    w0 = _weights()
    w1, m = request(sock, "train", CFG, w0)
    assert w1 is not None and set(w1) == set(w0) and m["num-examples"] == 12  # 4 unanswered cases skipped
    assert any(not (w1[k] == w0[k]).all() for k in w0)
    again, m2 = request(sock, "train", CFG, w0)
    assert m2["import-s"] < 0.05  # torch and the training code stay loaded between tasks
    assert all((again[k] == w1[k]).all() for k in w0)  # same seed, same data, same result
    none, ev = request(sock, "evaluate", CFG, w1)
    assert none is None and ev["num-examples"] == 12 and 0.0 <= ev["accuracy"] <= 1.0
    with pytest.raises(TrainerError, match="unknown architecture 'nope'"):
        request(sock, "train", {**CFG, "arch": "nope"}, w0)
    with pytest.raises(TrainerError, match="unknown trainer task 'fly'"):
        request(sock, "fly", CFG, w0)
    assert proc.alive()
    assert request(sock, "evaluate", CFG, w1)[1]["num-examples"] == 12


def test_trainer_refuses_a_client_without_its_key(trainer) -> None:
    from multiprocessing import AuthenticationError

    sock, _data, proc = trainer
    with pytest.raises((AuthenticationError, OSError, EOFError)):
        Client(str(sock), family="AF_UNIX", authkey=b"x" * 32)
    assert proc.alive() and request(sock, "evaluate", CFG, _weights())[1]["num-examples"] == 12
    assert oct(sock.stat().st_mode & 0o777) == "0o600" and oct(key_path(sock).stat().st_mode & 0o777) == "0o600"


def test_unreachable_trainer_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TrainerError, match="not reachable"):
        request(tmp_path / "none.sock", "train", CFG, {})


def _message(op: str) -> Message:
    content = RecordDict({"arrays": to_record(_weights()), "config": ConfigRecord({**CFG, "server-round": 1})})
    return Message(content, dst_node_id=7, message_type=op)


def test_client_app_handlers_with_the_trainer_and_in_process(trainer, monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_task_id", "_run_id", "_node_id"):  # what flwr-clientapp sets when it pulls its task
        monkeypatch.setattr(TaskIdentity, attr, 1)
    sock, data, _proc = trainer
    results = {}
    for name, extra in (("trainer", {"trainer": str(sock)}), ("in-process", {})):
        ctx = Context(run_id=1, node_id=7, node_config={"region": "east", "data-dir": str(data), **extra},
                      state=RecordDict(), run_config={})
        reply = client_train(_message("train"), ctx)
        assert not reply.has_error()
        m = reply.content["metrics"]
        assert m["trainer"] == (1.0 if extra else 0.0) and m["num-examples"] == 12
        for key in ("sent-at", "dispatch-s", "startup-s", "import-s", "data-s", "compute-s", "done-at"):
            assert key in m, key
        assert reply.content["info"]["region"] == "east"
        results[name] = from_record(reply.content["arrays"])
        ev = client_evaluate(_message("evaluate"), ctx).content["metrics"]
        assert ev["num-examples"] == 12 and ev["trainer"] == m["trainer"]
    # The trainer does exactly what the ClientApp would do in its own process.
    assert all((results["trainer"][k] == results["in-process"][k]).all() for k in results["trainer"])


def test_trainer_exits_when_its_parent_is_gone(tmp_path: Path) -> None:
    data = make_learning_store(tmp_path / "data", 8, seed=2)
    sock = Path("/tmp") / f"edgefed-test-orphan-{os.getpid()}" / "t.sock"
    # A parent that starts the trainer (watching it) and then just waits; we SIGKILL that parent.
    code = ("import subprocess, sys, os, time; from federation.trainer import trainer_argv; "
            f"p = subprocess.Popen(trainer_argv({str(sock)!r}, {str(data)!r}, parent_pid=os.getpid())); "
            "print(p.pid, flush=True); time.sleep(600)")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        wait_ready(sock, 120)
        tree = descendants(parent.pid)
        assert child in [p for p, _ in tree]
        parent.kill()  # SIGKILL to the parent only, not to its child
        parent.wait(10)
        deadline = time.monotonic() + 15
        while alive_pids(tree) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert alive_pids(tree) == []
    finally:
        if parent.poll() is None:
            parent.kill()
        for f in (sock, key_path(sock)):
            f.unlink(missing_ok=True)
        if sock.parent.exists():
            sock.parent.rmdir()


def test_edgefed_fed_supernode_stops_its_trainer_and_flower_on_sigterm(tmp_path: Path) -> None:
    data = make_learning_store(tmp_path / "data", 8, seed=3)
    wrapper = ManagedProcess(
        "edgefed-fed-supernode",
        [sys.executable, "-c", "from shared.cli import main; main()", "fed", "supernode", "--region", "west",
         "--data-dir", str(data), "--superlink", f"127.0.0.1:{free_port()}", "--port", str(free_port()),
         "--flwr-home", str(tmp_path / "home")],
        tmp_path / "supernode.log",
    ).start()
    try:
        deadline = time.monotonic() + 120
        # the warm SuperNode (federation.warm_node, the default) with its SuperExec
        while not any("federation.warm_node superexec" in " ".join(_cmdline(p)) for p, _ in descendants(wrapper.pid)):
            assert wrapper.alive() and time.monotonic() < deadline, wrapper.log_tail()
            time.sleep(0.2)
        tree = descendants(wrapper.pid)
        trainer = [p for p, _ in tree if "federation.trainer" in " ".join(_cmdline(p))]
        assert len(trainer) == 1, (tree, wrapper.log_tail())
        sock = Path(_cmdline(trainer[0])[_cmdline(trainer[0]).index("--socket") + 1])
        assert sock.exists()
        os.kill(wrapper.pid, signal.SIGTERM)  # the wrapper only: it must take the trainer and Flower with it
        assert wrapper.proc is not None and wrapper.proc.wait(30) == 0, wrapper.log_tail()
        deadline = time.monotonic() + 10
        while alive_pids(tree) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert alive_pids(tree) == [], wrapper.log_tail()
        assert not sock.parent.exists()  # the private socket directory is removed
    finally:
        wrapper.stop()


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def test_run_task_reuses_the_region_data_until_a_file_changes(tmp_path: Path) -> None:
    import numpy as np

    from federation.trainer import run_task

    data = make_learning_store(tmp_path / "data", 16, seed=3)
    _, m1 = run_task("evaluate", CFG, _weights(), data)
    _, m2 = run_task("evaluate", CFG, _weights(), data)
    assert (m1["data-memory-hit"], m2["data-memory-hit"]) == (0.0, 1.0)
    assert m2["num-examples"] == m1["num-examples"] and m2["accuracy"] == m1["accuracy"]
    rng = np.random.default_rng(0)  # a site adds labelled data: read again, and it counts
    np.savez(data / "extra.npz", x=rng.random((4, 1, 32, 32), dtype=np.float32), y=np.array([0, 1, 0, 1]))
    _, m3 = run_task("evaluate", CFG, _weights(), data)
    assert m3["data-memory-hit"] == 0.0 and m3["num-examples"] == m1["num-examples"] + 4
