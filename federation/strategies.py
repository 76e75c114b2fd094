"""Flower's own message-API strategies by name, with optional server-side differential privacy.

``build_strategy(spec)`` returns the strategy object and a description of the privacy settings
applied (what ``result.json`` records under ``privacy``). Strategies: ``fedavg``, ``fedprox``,
``fedadam``, ``fedavgm`` (and ``fedyogi``, ``fedadagrad``, ``fedmedian``, ``fedtrimmedavg``); their
keyword parameters come from ``spec.strategy_params`` and are checked against the constructor.

Differential privacy (``spec.differential_privacy``): ``{"clipping": "fixed" | "adaptive",
"noise_multiplier": float, "clipping_norm": float (fixed; the initial norm for adaptive),
"num_sampled_clients": int (default: min_fit), "target_clipped_quantile", "clip_norm_lr"}``, wrapped
around the strategy with Flower's ``DifferentialPrivacyServerSide{Fixed,Adaptive}Clipping``.

SecAgg+ (``spec.secagg``, ``shared.federation_api.SecAggSettings``): Flower 1.41 runs it only on its
legacy path, so ``build_legacy_strategy`` builds the legacy strategy of the same name and parameters
for ``federation.secure_agg_server``; robust aggregators (``fedmedian``, ``fedtrimmedavg``) and the
central DP wrappers need each region's own update, which SecAgg+ hides, and are refused with it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from federation.spec import FedRunSpec

__all__ = [
    "STRATEGIES",
    "SECAGG_STRATEGIES",
    "StrategyConfigError",
    "build_strategy",
    "build_legacy_strategy",
    "check_strategy",
    "secagg_settings",
]

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedavgm", "fedyogi", "fedadagrad", "fedmedian", "fedtrimmedavg")
_CLASS_NAMES = {
    "fedavg": "FedAvg",
    "fedprox": "FedProx",
    "fedadam": "FedAdam",
    "fedavgm": "FedAvgM",
    "fedyogi": "FedYogi",
    "fedadagrad": "FedAdagrad",
    "fedmedian": "FedMedian",
    "fedtrimmedavg": "FedTrimmedAvg",
}
# Set by the run from the spec itself; not allowed in strategy_params.
_RESERVED = {"fraction_train", "min_train_nodes", "min_available_nodes", "fraction_evaluate", "min_evaluate_nodes"}
# Aggregators that only need the (weighted) sum of the updates, which is all SecAgg+ reveals.
SECAGG_STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedavgm", "fedyogi", "fedadagrad")
# Message-API-only parameters: the legacy strategies that SecAgg+ runs on have no such option.
_MESSAGE_API_ONLY = {"arrayrecord_key", "configrecord_key", "weighted_by_key", "train_metrics_aggr_fn",
                     "evaluate_metrics_aggr_fn"}
_DP_KEYS = {"clipping", "noise_multiplier", "clipping_norm", "num_sampled_clients", "target_clipped_quantile",
            "clip_norm_lr", "clipped_count_stddev"}


class StrategyConfigError(ValueError):
    """A strategy name, parameter or privacy setting that cannot be used."""


def _strategy_class(name: str) -> type:
    from flwr.serverapp import strategy as fs

    key = name.lower()
    if key not in _CLASS_NAMES:
        raise StrategyConfigError(f"unknown strategy {name!r}; use one of {', '.join(STRATEGIES)}")
    return getattr(fs, _CLASS_NAMES[key])


def check_strategy(spec: FedRunSpec) -> None:
    """Raise ``StrategyConfigError`` for an unknown strategy, parameter or DP setting (no Flower run needed)."""
    cls = _strategy_class(spec.strategy)
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self"} - _RESERVED
    bad = sorted(set(spec.strategy_params) - allowed)
    if bad:
        raise StrategyConfigError(
            f"strategy {spec.strategy!r} has no parameter(s) {', '.join(bad)}; allowed: {', '.join(sorted(allowed))}"
        )
    for k, v in spec.strategy_params.items():
        if not isinstance(v, (int, float, bool, str)):
            raise StrategyConfigError(f"strategy parameter {k!r} must be a number, bool or string, got {v!r}")
    dp = spec.differential_privacy
    if dp is not None:
        unknown = sorted(set(dp) - _DP_KEYS)
        if unknown:
            raise StrategyConfigError(f"differential_privacy has unknown key(s) {', '.join(unknown)}")
        if dp.get("clipping", "fixed") not in ("fixed", "adaptive"):
            raise StrategyConfigError(
                f"differential_privacy.clipping must be 'fixed' or 'adaptive', got {dp['clipping']!r}"
            )
        if float(dp.get("noise_multiplier", 0.0)) < 0:
            raise StrategyConfigError("differential_privacy.noise_multiplier must be >= 0")
        if float(dp.get("clipping_norm", 1.0)) <= 0:
            raise StrategyConfigError("differential_privacy.clipping_norm must be > 0")
    if spec.secagg is not None:
        _check_secagg(spec)
    if not 0 < spec.fraction_fit <= 1:
        raise StrategyConfigError(f"fraction_fit must be in (0, 1], got {spec.fraction_fit}")
    if spec.min_fit < 1 or spec.min_available < 1:
        raise StrategyConfigError("min_fit and min_available must be at least 1")
    if spec.rounds < 1:
        raise StrategyConfigError(f"rounds must be at least 1, got {spec.rounds}")


def secagg_settings(spec: FedRunSpec) -> dict[str, Any] | None:
    """``spec.secagg`` checked and completed with Flower's defaults (``timeout``: the round timeout); None when off."""
    if spec.secagg is None:
        return None
    from pydantic import ValidationError

    from shared.federation_api import SecAggSettings

    try:
        settings = SecAggSettings.model_validate(spec.secagg).model_dump()
    except ValidationError as exc:
        problems = [
            f"{'.'.join(str(p) for p in err['loc']) or 'value'}: {err['msg']}" for err in exc.errors()[:3]
        ]
        raise StrategyConfigError(f"secagg: {'; '.join(problems)}") from None
    if settings["timeout"] is None:
        settings["timeout"] = float(spec.round_timeout_s)
    return settings


def _check_secagg(spec: FedRunSpec) -> None:
    secagg_settings(spec)
    if spec.strategy.lower() not in SECAGG_STRATEGIES:
        raise StrategyConfigError(
            f"strategy {spec.strategy!r} cannot run with secagg: it needs each region's own update and SecAgg+ "
            f"reveals only their sum; use one of {', '.join(SECAGG_STRATEGIES)}"
        )
    if spec.differential_privacy is not None:
        raise StrategyConfigError(
            "secagg cannot be combined with differential_privacy: Flower's server-side DP wrappers clip each "
            "region's update, which SecAgg+ hides from the server; switch one of them off"
        )
    if spec.min_fit < 2:
        raise StrategyConfigError(f"secagg needs at least 2 regions per round (min_fit >= 2), got {spec.min_fit}")
    legacy_only = sorted(set(spec.strategy_params) & _MESSAGE_API_ONLY)
    if legacy_only:
        raise StrategyConfigError(f"strategy parameter(s) {', '.join(legacy_only)} cannot be used with secagg")


def build_legacy_strategy(
    spec: FedRunSpec, initial_arrays: list[Any], fit_config: Callable[[int], dict[str, Any]]
) -> Any:
    """Flower's legacy strategy of ``spec.strategy`` (the class SecAggPlusWorkflow drives), same parameters.

    ``initial_arrays`` are the starting weights (the server optimisers of FedAdam & co. start from
    them); ``fit_config(round)`` is what each region's training instructions carry.
    """
    from flwr.common import ndarrays_to_parameters
    from flwr.server import strategy as legacy

    check_strategy(spec)
    if spec.secagg is None:
        raise StrategyConfigError("the legacy strategy is only used for runs with secagg")
    cls = getattr(legacy, _CLASS_NAMES[spec.strategy.lower()])
    try:
        return cls(
            fraction_fit=spec.fraction_fit,
            fraction_evaluate=0.0,  # regions evaluate through the message-API strategy, as without secagg
            min_fit_clients=spec.min_fit,
            min_evaluate_clients=1,
            min_available_clients=spec.min_available,
            on_fit_config_fn=fit_config,
            initial_parameters=ndarrays_to_parameters(initial_arrays),
            **spec.strategy_params,
        )
    except (TypeError, ValueError) as exc:
        raise StrategyConfigError(f"Flower rejected the strategy settings: {exc}") from None


def build_strategy(spec: FedRunSpec, fraction_evaluate: float = 1.0) -> tuple[Any, dict[str, Any]]:
    """The configured Flower strategy (DP-wrapped when asked) and the privacy record for result.json."""
    check_strategy(spec)
    try:
        return _build(spec, fraction_evaluate)
    except ValueError as exc:  # Flower's own checks (e.g. DP noise vs clipped-count noise)
        raise StrategyConfigError(f"Flower rejected the strategy settings: {exc}") from None


def _build(spec: FedRunSpec, fraction_evaluate: float) -> tuple[Any, dict[str, Any]]:
    from flwr.serverapp.strategy import (
        DifferentialPrivacyServerSideAdaptiveClipping,
        DifferentialPrivacyServerSideFixedClipping,
    )

    cls = _strategy_class(spec.strategy)
    strategy = cls(
        fraction_train=spec.fraction_fit,
        fraction_evaluate=fraction_evaluate,
        min_train_nodes=spec.min_fit,
        min_evaluate_nodes=1 if fraction_evaluate > 0 else 0,
        min_available_nodes=spec.min_available,
        **spec.strategy_params,
    )
    privacy: dict[str, Any] = {"differential_privacy": None, "secagg": None}
    secagg = secagg_settings(spec)
    if secagg is not None:
        privacy["secagg"] = {
            "protocol": "SecAgg+",
            "workflow": "flwr.server.workflow.SecAggPlusWorkflow",
            "client_mod": "flwr.client.mod.secaggplus_mod",
            **secagg,
        }
    dp = spec.differential_privacy
    if dp is not None:
        clipping = dp.get("clipping", "fixed")
        noise = float(dp.get("noise_multiplier", 1.0))
        sampled = int(dp.get("num_sampled_clients", spec.min_fit))
        norm = float(dp.get("clipping_norm", 1.0))
        if clipping == "fixed":
            strategy = DifferentialPrivacyServerSideFixedClipping(strategy, noise, norm, sampled)
            privacy["differential_privacy"] = {
                "mechanism": "central Gaussian, server-side fixed clipping",
                "wrapper": type(strategy).__name__,
                "noise_multiplier": noise,
                "clipping_norm": norm,
                "num_sampled_clients": sampled,
            }
        else:
            quantile = float(dp.get("target_clipped_quantile", 0.5))
            clip_lr = float(dp.get("clip_norm_lr", 0.2))
            strategy = DifferentialPrivacyServerSideAdaptiveClipping(
                strategy, noise, sampled, initial_clipping_norm=norm, target_clipped_quantile=quantile,
                clip_norm_lr=clip_lr, clipped_count_stddev=dp.get("clipped_count_stddev"),
            )
            privacy["differential_privacy"] = {
                "mechanism": "central Gaussian, server-side adaptive clipping",
                "wrapper": type(strategy).__name__,
                "noise_multiplier": noise,
                "initial_clipping_norm": norm,
                "target_clipped_quantile": quantile,
                "clip_norm_lr": clip_lr,
                "num_sampled_clients": sampled,
            }
    return strategy, privacy
