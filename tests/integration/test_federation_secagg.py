"""SecAgg+ on Flower's real deployment engine: a SuperLink and three SuperNodes on free loopback ports, a run
with ``secagg`` set goes through Flower's SecAggPlusWorkflow and secaggplus_mod and still trains the model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from federation.processes import FlowerDeployment
from federation.runner import FederationClient, read_result
from federation.spec import FedRunSpec
from tests.fed_fixtures import make_edge_checkpoint, make_reference, make_regions

RUN_TIMEOUT = 300  # a loaded 2-core box starts each ClientApp process in 5-15 s; SecAgg+ sends 4 per region


@pytest.fixture(scope="module")
def fed3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FlowerDeployment, FederationClient, Path]]:
    root = tmp_path_factory.mktemp("fed-secagg")
    make_edge_checkpoint(root / "edge.pt")
    make_reference(root / "reference.npz", n=32)
    dep = FlowerDeployment(root / "deployment", make_regions(root, ["east", "north", "south"], n=16)).start()
    try:
        yield dep, FederationClient(dep.address, dep.flwr_home), root
    finally:
        dep.stop()


def test_a_secagg_run_trains_through_flowers_secaggplus_workflow_to_the_plain_runs_model(fed3) -> None:
    from shared.models import load_checkpoint

    dep, client, root = fed3
    base = dict(
        model_name="t-edge", kind="edge", task="t", initial_checkpoint=root / "edge.pt", reference_data=root /
        "reference.npz", rounds=1, min_available=3, min_fit=3, lr=3e-3, round_timeout_s=120, fraction_evaluate=0.0,
        strategy="fedprox", strategy_params={"proximal_mu": 0.01},
    )
    plain = FedRunSpec(output_dir=root / "plain", **base)  # type: ignore[arg-type]
    spec = FedRunSpec(output_dir=root / "secagg", secagg={"num_shares": 3, "reconstruction_threshold": 2,
                                                          "clipping_range": 4.0}, **base)  # type: ignore[arg-type]
    assert client.wait(client.submit(plain), RUN_TIMEOUT).status == "finished", read_result(plain.output_dir).reason
    state = client.wait(client.submit(spec), RUN_TIMEOUT)
    result = read_result(spec.output_dir)
    assert state.status == "finished", (state, result.reason, dep.logs())
    sa = result.privacy["secagg"]
    assert sa["protocol"] == "SecAgg+" and sa["workflow"].endswith("SecAggPlusWorkflow")
    assert (sa["num_shares"], sa["reconstruction_threshold"], sa["clipping_range"]) == (3, 2, 4.0)
    assert sa["timeout"] == 120.0 and sa["modulus_range"] == 2**32
    assert result.privacy["differential_privacy"] is None
    assert read_result(plain.output_dir).privacy["secagg"] is None
    (r,) = result.rounds
    assert r["clients"] == 3 and r["sampled"] == 3 and r["failures"] == []
    assert r["regions"] == ["east", "north", "south"] and result.regions == ["east", "north", "south"]
    # Every region ran the four protocol stages; its training metrics still reach the record, its weights do not.
    assert r["secagg"]["num_shares"] == 3 and r["secagg"]["reconstruction_threshold"] == 2
    assert r["secagg"]["masked_updates"] == 3 and r["secagg"]["dropped"] == 0 and r["secagg"]["stopped_at"] is None
    assert set(r["secagg"]["stage_s"]) == {"setup", "share_keys", "collect_masked_vectors", "unmask"}
    for region in ("east", "north", "south"):
        assert r["per_region"][region]["train"]["num-examples"] == 12  # 16 cases, 4 unanswered
    assert r["train_metrics"]["train-loss"] > 0 and r["max_client_compute_s"] > 0
    assert r["num_examples"] == 32 and 0 <= r["val_accuracy"] <= 1
    # The unmasked sum is the weighted average of the same local updates the plain run averaged in the clear:
    # equal up to SecAgg+'s quantisation, and the model moved away from the start.
    start = load_checkpoint(root / "edge.pt").model.state_dict()
    clear = load_checkpoint(read_result(plain.output_dir).global_checkpoint).model.state_dict()
    masked = load_checkpoint(result.global_checkpoint).model.state_dict()
    assert not start["head.weight"].equal(masked["head.weight"])
    for name, tensor in clear.items():
        if tensor.dtype.is_floating_point:
            assert float((tensor - masked[name]).abs().max()) < 1e-3, name
    assert result.final_metrics["val_loss"] == pytest.approx(read_result(plain.output_dir).final_metrics["val_loss"],
                                                             abs=1e-3)
