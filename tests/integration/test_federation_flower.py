"""Federation runs on Flower's real deployment engine: a SuperLink and SuperNodes on free loopback ports,
regional learning stores written as the edge agent writes them, runs submitted with FederationClient."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from federation.processes import FlowerDeployment, alive_pids, descendants
from federation.runner import FederationClient, read_result
from federation.spec import FedRunSpec
from federation.strategies import StrategyConfigError
from shared.bench.fed import round_breakdown
from tests.fed_fixtures import make_edge_checkpoint, make_learning_store, make_reference, make_regions

RUN_TIMEOUT = 300  # generous: a loaded 2-core CI box runs each ClientApp process start in 5-15 s


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FlowerDeployment, FederationClient, Path]]:
    root = tmp_path_factory.mktemp("fed")
    make_edge_checkpoint(root / "edge.pt")
    make_reference(root / "reference.npz")
    dep = FlowerDeployment(root / "deployment", make_regions(root, ["north", "south"])).start()
    try:
        yield dep, FederationClient(dep.address, dep.flwr_home), root
    finally:
        dep.stop()


def _spec(root: Path, out: str, **kw: object) -> FedRunSpec:
    base: dict[str, object] = dict(
        model_name="t-edge", kind="edge", task="t", initial_checkpoint=root / "edge.pt", output_dir=root / out,
        reference_data=root / "reference.npz", rounds=2, min_available=2, min_fit=2, lr=3e-3, round_timeout_s=60,
    )
    base.update(kw)
    return FedRunSpec(**base)  # type: ignore[arg-type]


def test_two_rounds_write_a_loadable_global_model_and_per_round_metrics(fed) -> None:
    from shared.models import load_checkpoint

    dep, client, root = fed
    spec = _spec(root, "run-fedavg")
    run_id = client.submit(spec)
    state = client.wait(run_id, RUN_TIMEOUT)
    result = read_result(spec.output_dir)
    assert state.status == "finished", (state, result.reason, dep.logs())
    assert result.status == "finished" and result.run_id == run_id
    assert result.regions == ["north", "south"]
    assert [r["round"] for r in result.rounds] == [1, 2]
    for r in result.rounds:
        assert r["clients"] == 2 and r["failures"] == []
        assert set(r["per_region"]) == {"north", "south"}
        # Each toy store holds 32 cases; the 8 unanswered ones are skipped, as is the other task's case.
        assert all(v["train"]["num-examples"] == 24 for v in r["per_region"].values())
        assert all(v["evaluate"]["num-examples"] == 24 for v in r["per_region"].values())
        assert 0.0 <= r["val_accuracy"] <= 1.0 and r["num_examples"] == 64
        assert r["round_wall_s"] >= r["max_client_compute_s"] > 0
        # The regions' trainers did the work (the ClientApp never imported torch); the round's time is split up.
        assert all(v["train"]["trainer"] == 1.0 for v in r["per_region"].values())
        parts = round_breakdown(r)
        assert parts is not None and parts["compute"] > 0 and parts["dispatch"] >= 0 and parts["reply"] >= 0
        assert r["client_eval"]["accuracy"] is not None
    assert result.initial_metrics["num_examples"] == 64
    assert result.final_metrics["val_accuracy"] == pytest.approx(result.rounds[-1]["val_accuracy"])
    # The toy task is learnable: two rounds of fine-tuning beat the random start.
    assert result.final_metrics["val_loss"] < result.initial_metrics["val_loss"]
    ckpt = load_checkpoint(result.global_checkpoint)  # weights_only=True inside
    start = load_checkpoint(root / "edge.pt")
    assert ckpt.meta.parent_version == "1" and ckpt.meta.arch == "edge-cnn"
    assert ckpt.meta.metrics["val_accuracy"] == pytest.approx(result.final_metrics["val_accuracy"])
    w0, w1 = start.model.state_dict()["head.weight"], ckpt.model.state_dict()["head.weight"]
    assert not w0.equal(w1)
    assert result.privacy == {"differential_privacy": None, "secagg": None}


def test_dp_run_with_fedadam_completes_and_records_privacy(fed) -> None:
    _dep, client, root = fed
    spec = _spec(root, "run-dp", rounds=1, strategy="fedadam", strategy_params={"eta": 0.01},
                 fraction_evaluate=0.0, differential_privacy={"clipping": "fixed", "noise_multiplier": 0.1,
                                                                "clipping_norm": 5.0, "num_sampled_clients": 2})
    state = client.wait(client.submit(spec), RUN_TIMEOUT)
    result = read_result(spec.output_dir)
    assert state.status == "finished", (state, result.reason)
    dp = result.privacy["differential_privacy"]
    assert dp["wrapper"] == "DifferentialPrivacyServerSideFixedClipping"
    assert dp["noise_multiplier"] == 0.1 and dp["clipping_norm"] == 5.0
    assert len(result.rounds) == 1 and "client_eval" not in result.rounds[0]


def test_bad_specs_are_refused_before_reaching_the_superlink(fed) -> None:
    _dep, client, root = fed
    with pytest.raises(StrategyConfigError, match="unknown strategy 'fedfoo'"):
        client.submit(_spec(root, "bad-1", strategy="fedfoo"))
    with pytest.raises(StrategyConfigError, match="has no parameter"):
        client.submit(_spec(root, "bad-2", strategy="fedprox", strategy_params={"mu": 0.1}))
    with pytest.raises(FileNotFoundError, match="initial checkpoint"):
        client.submit(_spec(root, "bad-3", initial_checkpoint=root / "missing.pt"))
    assert not (root / "bad-1" / "result.json").exists()


def test_a_supernode_killed_mid_round_is_recorded_and_leaves_no_process(fed) -> None:
    dep, client, root = fed
    east = dep.start_supernode("east", make_learning_store(root / "data-east", 32, seed=7))
    spec = _spec(root, "run-kill", rounds=1, min_available=3, min_fit=2, fraction_evaluate=0.0, round_timeout_s=30)
    run_id = client.submit(spec)
    deadline = time.monotonic() + 90
    while "Receiving: train message" not in east.log_path.read_text(errors="replace"):
        assert time.monotonic() < deadline, east.log_tail()
        time.sleep(0.2)
    tree = [(east.pid, 0), *descendants(east.pid)]
    east.kill()  # SIGKILL to the SuperNode's process group, mid-round
    state = client.wait(run_id, RUN_TIMEOUT)
    result = read_result(spec.output_dir)
    assert state.status == "finished", (state, result.reason)
    (r,) = result.rounds
    assert r["clients"] == 2 and r["sampled"] == 3
    assert set(r["regions"]) == {"north", "south"} and "east" not in result.regions
    assert r["failures"], "the lost SuperNode must be recorded"
    # SuperExec and the ClientApp run in sessions of their own; they must still go with their SuperNode.
    deadline = time.monotonic() + 15
    while alive_pids(tree[1:]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert alive_pids(tree[1:]) == []


def test_a_plain_flower_supernode_runs_a_round_too(tmp_path: Path) -> None:
    """``--no-warm``: Flower's own flower-supernode, a new flwr-clientapp process per message."""
    make_edge_checkpoint(tmp_path / "edge.pt")
    make_reference(tmp_path / "reference.npz")
    with FlowerDeployment(tmp_path / "d", make_regions(tmp_path, ["solo"], n=16), warm=False) as dep:
        assert "federation.warm_node" not in " ".join(dep.supernodes["solo"].argv)
        spec = _spec(tmp_path, "run-plain", rounds=1, min_available=1, min_fit=1, fraction_evaluate=0.0)
        state = FederationClient(dep.address, dep.flwr_home).wait(
            FederationClient(dep.address, dep.flwr_home).submit(spec), RUN_TIMEOUT)
        assert state.status == "finished", (state, dep.logs())
    assert read_result(spec.output_dir).rounds[0]["regions"] == ["solo"]


def test_warm_supernodes_fork_their_clientapps(fed) -> None:
    dep, _client, _root = fed
    log = dep.supernodes["north"].log_path.read_text(errors="replace")
    assert "warm ClientApp fork server ready" in log
    assert "federation.warm_node" in " ".join(dep.supernodes["north"].argv)


def test_too_few_replies_fail_the_run_with_a_reason(fed) -> None:
    _dep, client, root = fed
    spec = _spec(root, "run-short", rounds=1, min_available=2, min_fit=5, fraction_evaluate=0.0, round_timeout_s=3)
    state = client.wait(client.submit(spec), RUN_TIMEOUT)
    result = read_result(spec.output_dir)
    assert state.status == "failed" and result.status == "failed"
    assert "SuperNode(s) connected within 3 s; the run needs 5" in result.reason
    assert result.global_checkpoint is None


@pytest.mark.parametrize("warm", [True, False], ids=["warm", "plain"])
def test_stopping_the_deployment_leaves_no_flower_process(tmp_path: Path, warm: bool) -> None:
    dep = FlowerDeployment(tmp_path / "d", make_regions(tmp_path, ["solo"], n=8), warm=warm).start()
    try:
        deadline = time.monotonic() + 60
        # SuperLink, SuperNode and a SuperExec for each (warm: and the ClientApp fork server)
        while len(procs := dep.all_pids()) < (5 if warm else 4):
            assert time.monotonic() < deadline, (procs, dep.logs())
            time.sleep(0.2)
    finally:
        dep.stop()
    deadline = time.monotonic() + 10
    while alive_pids(procs) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert alive_pids(procs) == []


def test_edgefed_fed_superlink_stops_flower_and_its_children_on_sigterm(tmp_path: Path) -> None:
    import os
    import signal
    import sys

    from shared.processes import ManagedProcess, free_port, wait_for_port

    port = free_port()
    wrapper = ManagedProcess(
        "edgefed-fed-superlink",
        [sys.executable, "-c", "from shared.cli import main; main()", "fed", "superlink", "--port", str(port),
         "--flwr-home", str(tmp_path / "home")],
        tmp_path / "superlink.log",
    ).start()
    try:
        wait_for_port("127.0.0.1", port, 60, alive=wrapper.alive)
        deadline = time.monotonic() + 30
        while len(tree := descendants(wrapper.pid)) < 2:  # flower-superlink and its SuperExec
            assert time.monotonic() < deadline, (tree, wrapper.log_tail())
            time.sleep(0.2)
        os.kill(wrapper.pid, signal.SIGTERM)  # the wrapper only: it must take Flower's processes with it
        assert wrapper.proc is not None and wrapper.proc.wait(30) == 0, wrapper.log_tail()
        deadline = time.monotonic() + 10
        while alive_pids(tree) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert alive_pids(tree) == [], wrapper.log_tail()
    finally:
        wrapper.stop()
