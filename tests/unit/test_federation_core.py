"""The Flower side's pieces without a deployment: data rules, loss, strategies, argv, spec and result files."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_agent.learning_store import LearnedCase
from federation.processes import node_config, superlink_argv, supernode_argv
from federation.runner import read_result
from federation.spec import FedRunSpec
from federation.strategies import StrategyConfigError, build_strategy, check_strategy
from federation.training import LocalData, _loss, arrays_to_state, cases_to_data, state_to_arrays, train_local

CHW = (1, 8, 8)


def _case(task: str = "t", label: int | None = None, cloud: int | None = None, probs: list[float] | None = None,
          shape: tuple[int, ...] = (1, 1, 8, 8)) -> LearnedCase:
    p = None if probs is None else np.asarray(probs, dtype=np.float32)
    return LearnedCase("r", 0.0, task, "m", "1", np.zeros(shape, np.float32), 0, 0.5, cloud, p, None, label, {})


def _spec(**kw: object) -> FedRunSpec:
    return FedRunSpec(model_name="m", kind="edge", task="t", initial_checkpoint=Path("a.pt"),
                      output_dir=Path("out"), **kw)  # type: ignore[arg-type]


def test_confirmed_label_wins_cloud_label_is_the_fallback_and_cases_without_targets_are_skipped() -> None:
    cases = [
        _case(label=1, cloud=0, probs=[0.8, 0.2]),  # inspector says 1, cloud said 0: hard label 1, soft kept
        _case(cloud=0, probs=[0.7, 0.3]),  # cloud only
        _case(probs=[0.4, 0.6]),  # soft only
        _case(),  # nothing: skipped
        _case(task="other", label=1),  # another task: skipped
        _case(label=5),  # label out of range: skipped
        _case(label=0, shape=(1, 3, 8, 8)),  # wrong channels: skipped
        _case(label=1, shape=(1, 1, 16, 16)),  # other resolution: resized
    ]
    data, skipped = cases_to_data(cases, task="t", num_classes=2, input_chw=CHW)
    assert data.hard.tolist() == [1, 0, -1, 1]
    assert torch.allclose(data.soft[0], torch.tensor([0.8, 0.2]))
    assert torch.isnan(data.soft[3]).all()
    assert tuple(data.x.shape) == (4, *CHW)
    assert skipped == {"other_task": 1, "bad_input": 1, "no_target": 1, "bad_label": 1}


def test_loss_mixes_soft_and_hard_targets_by_soft_weight() -> None:
    logits = torch.tensor([[2.0, 0.0]])
    hard, soft = torch.tensor([1]), torch.tensor([[0.5, 0.5]])
    logp = torch.log_softmax(logits, 1)
    ce = -logp[0, 1]
    kl = (soft * (soft.log() - logp)).sum()
    assert _loss(logits, hard, soft, 0.0) == pytest.approx(float(ce))
    assert _loss(logits, hard, soft, 1.0) == pytest.approx(float(kl))
    assert _loss(logits, hard, soft, 0.25) == pytest.approx(float(0.25 * kl + 0.75 * ce))
    # No hard label: all weight on the cloud's probabilities; no soft target: all on the label.
    assert _loss(logits, torch.tensor([-1]), soft, 0.25) == pytest.approx(float(kl))
    assert _loss(logits, hard, torch.full((1, 2), float("nan")), 0.25) == pytest.approx(float(ce))


def test_local_training_learns_and_weights_round_trip_without_integer_buffers() -> None:
    from shared.models import build_model

    torch.manual_seed(0)
    model = build_model("edge-cnn", in_channels=1, num_classes=2, width=4)
    arrays = state_to_arrays(model)
    assert not any(k.endswith("num_batches_tracked") for k in arrays)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 64)
    x = rng.normal(0, 1, (64, *CHW)).astype(np.float32) + y[:, None, None, None] * 2.0
    data = LocalData.from_labels(x, y, 2)
    first = train_local(model, data, epochs=1, lr=1e-2, batch_size=16)
    last = train_local(model, data, epochs=3, lr=1e-2, batch_size=16, proximal_mu=0.1)
    assert last["train-loss"] < first["train-loss"] and last["num-examples"] == 64
    bad = dict(arrays)
    bad.pop("head.bias")
    with pytest.raises(ValueError, match="lack tensor 'head.bias'"):
        arrays_to_state(model, bad)
    neg = dict(arrays, **{"features.0.1.running_var": -np.ones(4, np.float32)})
    assert float(arrays_to_state(model, neg)["features.0.1.running_var"].min()) > 0


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedadam", "fedavgm"])
def test_strategies_are_flowers_own(name: str) -> None:
    from flwr.serverapp import strategy as fs

    strategy, privacy = build_strategy(_spec(strategy=name, min_fit=2, min_available=3))
    assert type(strategy).__module__.startswith("flwr.serverapp.strategy")
    assert isinstance(strategy, fs.FedAvg) and strategy.min_train_nodes == 2
    assert privacy == {"differential_privacy": None, "secagg": None}


def test_dp_wrappers_and_bad_settings() -> None:
    fixed, p1 = build_strategy(_spec(differential_privacy={"noise_multiplier": 0.5, "clipping_norm": 2.0}))
    assert type(fixed).__name__ == "DifferentialPrivacyServerSideFixedClipping"
    assert p1["differential_privacy"]["clipping_norm"] == 2.0
    with pytest.raises(StrategyConfigError, match="Flower rejected.*clipped_count_stddev"):
        build_strategy(_spec(differential_privacy={"clipping": "adaptive", "noise_multiplier": 0.5}))
    adaptive, p2 = build_strategy(_spec(differential_privacy={"clipping": "adaptive", "noise_multiplier": 0.5,
                                                              "clipped_count_stddev": 1.0}))
    assert type(adaptive).__name__ == "DifferentialPrivacyServerSideAdaptiveClipping"
    assert p2["differential_privacy"]["mechanism"].endswith("adaptive clipping")
    for spec, msg in [
        (_spec(strategy="nope"), "unknown strategy"),
        (_spec(strategy_params={"eta": 0.1}), "has no parameter"),
        (_spec(differential_privacy={"clipping": "magic"}), "'fixed' or 'adaptive'"),
        (_spec(differential_privacy={"epsilon": 1}), "unknown key"),
        (_spec(rounds=0), "rounds must be"),
    ]:
        with pytest.raises(StrategyConfigError, match=msg):
            check_strategy(spec)


def test_flower_command_lines_are_offline_and_insecure_only_without_tls(tmp_path: Path) -> None:
    argv = superlink_argv("127.0.0.1", 9100)
    assert "--disable-runtime-dependency-installation" in argv and "--insecure" in argv
    tls = superlink_argv(port=9100, tls=__import__("federation.processes").processes.TlsFiles(Path("c"), Path("k")))
    assert "--insecure" not in tls and tls[tls.index("--ssl-certfile") + 1] == "c"
    node = supernode_argv("north", tmp_path, superlink="127.0.0.1:9100", port=9200, root_certificates=Path("ca"))
    assert node[node.index("--node-config") + 1] == f'region="north" data-dir="{tmp_path.resolve()}" threads=1'
    assert "--insecure" not in node and "--root-certificates" in node
    with pytest.raises(ValueError, match="free of quotes"):
        node_config('no"rth', tmp_path)


def test_spec_round_trips_and_result_files_are_checked(tmp_path: Path) -> None:
    spec = _spec(strategy_params={"proximal_mu": 0.1}, reference_data=Path("r.npz"))
    assert FedRunSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(TypeError, match="no field"):
        FedRunSpec.from_dict({**spec.to_dict(), "bogus": 1})
    with pytest.raises(FileNotFoundError):
        read_result(tmp_path)
    (tmp_path / "result.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_result(tmp_path)
    (tmp_path / "result.json").write_text(json.dumps({"status": "finished"}))
    with pytest.raises(ValueError, match="does not describe"):
        read_result(tmp_path)
    assert replace(spec, rounds=5).rounds == 5
