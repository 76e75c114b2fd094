"""SecAgg+ settings without a deployment: the request schema's rules, the spec checks, the legacy strategy the
workflow drives, the privacy record and the ClientApp mod's pass-through."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from federation.spec import FedRunSpec
from federation.strategies import StrategyConfigError, build_legacy_strategy, build_strategy, check_strategy
from shared.federation_api import FedRoundCreate, SecAggSettings


def _spec(**kw: object) -> FedRunSpec:
    base: dict[str, object] = dict(model_name="m", kind="edge", task="t", initial_checkpoint=Path("a.pt"),
                                   output_dir=Path("out"), min_fit=3, min_available=3, round_timeout_s=90.0)
    base.update(kw)
    return FedRunSpec(**base)  # type: ignore[arg-type]


def test_defaults_are_flowers_and_fractions_are_allowed() -> None:
    s = SecAggSettings()
    assert (s.num_shares, s.reconstruction_threshold, s.clipping_range) == (3, 2, 8.0)
    assert (s.quantization_range, s.modulus_range, s.max_weight, s.timeout) == (2**22, 2**32, 1000.0, None)
    f = SecAggSettings(num_shares=0.5, reconstruction_threshold=0.6)
    assert isinstance(f.num_shares, float) and isinstance(f.reconstruction_threshold, float)


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"num_shares": 2}, "num_shares as an integer must be at least 3"),
        ({"num_shares": 1.5}, "num_shares as a fraction must be in (0, 1]"),
        ({"num_shares": True}, "num_shares"),
        ({"reconstruction_threshold": 1}, "reconstruction_threshold as an integer must be at least 2"),
        ({"num_shares": 3, "reconstruction_threshold": 3}, "reconstruction_threshold (3) must be less than num_shares"),
        ({"reconstruction_threshold": 0.0}, "reconstruction_threshold as a fraction must be in (0, 1]"),
        ({"clipping_range": 0}, "clipping_range"),
        ({"quantization_range": 1.5}, "quantization_range"),
        ({"modulus_range": 3 * 2**20}, "modulus_range must be a power of 2"),
        ({"modulus_range": 2**33}, "modulus_range"),
        ({"modulus_range": 2**20}, "must be greater than quantization_range"),
        ({"timeout": -1}, "timeout"),
        ({"max_weight": 0}, "max_weight"),
        ({"shares": 3}, "shares"),
    ],
)
def test_bad_settings_are_refused_naming_the_field(fields: dict[str, object], words: str) -> None:
    with pytest.raises(ValidationError) as err:
        FedRoundCreate(model_name="m", secagg=fields)  # type: ignore[arg-type]
    text = str(err.value)
    assert "secagg" in text and words in text, text
    with pytest.raises(StrategyConfigError, match=r"^secagg: ") as err2:
        check_strategy(_spec(secagg=fields))
    assert words in str(err2.value)


def test_combinations_secagg_cannot_serve_are_refused() -> None:
    for spec, words in [
        (_spec(secagg={}, strategy="fedmedian"), "cannot run with secagg: it needs each region's own update"),
        (_spec(secagg={}, differential_privacy={"noise_multiplier": 0.1}), "cannot be combined with differential"),
        (_spec(secagg={}, min_fit=1), "at least 2 regions per round"),
        (_spec(secagg={}, strategy_params={"weighted_by_key": "n"}), "weighted_by_key cannot be used with secagg"),
        (_spec(secagg="on"), "secagg: "),
    ]:
        with pytest.raises(StrategyConfigError, match=words):
            check_strategy(spec)


def test_privacy_record_and_the_legacy_strategy_the_workflow_drives() -> None:
    from flwr.common import parameters_to_ndarrays
    from flwr.server import strategy as legacy

    spec = _spec(strategy="fedadam", strategy_params={"eta": 0.05}, secagg={"num_shares": 0.8, "clipping_range": 2.0})
    _strategy, privacy = build_strategy(spec)
    sa = privacy["secagg"]
    assert sa["protocol"] == "SecAgg+" and sa["workflow"] == "flwr.server.workflow.SecAggPlusWorkflow"
    assert sa["num_shares"] == 0.8 and sa["clipping_range"] == 2.0 and sa["timeout"] == 90.0  # the round timeout
    assert privacy["differential_privacy"] is None
    weights = [np.ones((2, 2), np.float32), np.zeros(3, np.float32)]
    s = build_legacy_strategy(spec, weights, lambda rnd: {"server-round": rnd})
    assert type(s) is legacy.FedAdam and s.eta == 0.05 and s.min_fit_clients == 3
    assert [a.shape for a in parameters_to_ndarrays(s.initial_parameters)] == [(2, 2), (3,)]
    prox = build_legacy_strategy(_spec(strategy="fedprox", strategy_params={"proximal_mu": 0.1}, secagg={}),
                                 weights, lambda rnd: {})
    assert type(prox) is legacy.FedProx and prox.proximal_mu == 0.1
    with pytest.raises(StrategyConfigError, match="only used for runs with secagg"):
        build_legacy_strategy(_spec(), weights, lambda rnd: {})


def test_the_client_mod_passes_other_messages_through_untouched(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
    from flwr.supercore.task_identity import TaskIdentity

    from federation.secure_agg import SECAGG_RECORD, secagg_mod

    assert SECAGG_RECORD == RECORD_KEY_CONFIGS
    for attr in ("_task_id", "_run_id", "_node_id"):  # what a Flower process sets before messages are built
        monkeypatch.setattr(TaskIdentity, attr, 1)
    msg = Message(RecordDict({"config": ConfigRecord({"lr": 0.1})}), dst_node_id=1, message_type="train")
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    seen: list[Message] = []
    assert secagg_mod(msg, ctx, lambda m, c: seen.append(m) or m) is msg
    assert seen == [msg] and dict(ctx.state) == {}
