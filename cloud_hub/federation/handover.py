"""Hand-over: a finished run's global model, gated against its parent, becomes a registered version.

The gate compares the reference-set metric of the global model with that of the starting model (both
measured by the ServerApp on the same reference set). A model that passes is registered with its
lineage: a cloud model as a checkpoint, an edge model compressed by the model factory into a signed
INT8 bundle (with its own INT8 accuracy gate) and stored with its source checkpoint. Either the
version is registered completely or nothing is left behind.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloud_hub.errors import HubServiceError, NotFound
from cloud_hub.federation.sources import SOURCE_FILE
from cloud_hub.registry import ModelVersionInfo, RegistryService
from federation.spec import FedResult

__all__ = [
    "GateDecision",
    "HandoverError",
    "HandoverPlan",
    "decide_gate",
    "json_safe",
    "new_version_name",
    "register_result",
]


class HandoverError(Exception):
    """The global model could not be registered; nothing was left registered."""


@dataclass(frozen=True)
class GateDecision:
    metric: str
    parent: float | None
    candidate: float | None
    min_improvement_pt: float
    passed: bool
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "parent": self.parent,
            "candidate": self.candidate,
            "min_improvement_pt": self.min_improvement_pt,
            "improvement_pt": None
            if self.parent is None or self.candidate is None
            else round(100.0 * (self.candidate - self.parent), 4),
            "passed": self.passed,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class HandoverPlan:
    """What the registration needs besides the result."""

    run_id: int
    model_name: str
    kind: str
    parent_version: str
    strategy: str
    flower_run_id: str
    signing_key: Path
    max_drop_pt: float = 1.0
    reference_limit: int | None = None
    extra_lineage: dict[str, Any] = field(default_factory=dict)


def _number(metrics: dict[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(float(value)):
        return None
    return float(value)


def decide_gate(result: FedResult, metric: str, min_improvement_pt: float) -> GateDecision:
    """Pass when the global model beats the starting model by at least ``min_improvement_pt`` points."""
    parent, candidate = _number(result.initial_metrics, metric), _number(result.final_metrics, metric)
    if parent is None or candidate is None:
        which = "starting" if parent is None else "global"
        return GateDecision(
            metric, parent, candidate, min_improvement_pt, False,
            f"rejected by gate: the run reported no {metric!r} for the {which} model on the reference set",
        )
    delta_pt = 100.0 * (candidate - parent)
    passed = delta_pt >= min_improvement_pt - 1e-9
    verdict = "passed gate" if passed else "rejected by gate"
    return GateDecision(
        metric, parent, candidate, min_improvement_pt, passed,
        f"{verdict}: {metric} {100 * candidate:.2f}% vs parent {100 * parent:.2f}% "
        f"({delta_pt:+.2f} pt; required {min_improvement_pt:+.2f} pt)",
    )


def new_version_name(parent_version: str, run_id: int) -> str:
    """The version a run registers: its parent's name plus the run, e.g. ``1-fed7``."""
    return f"{parent_version}-fed{run_id}"[:64]


def lineage_of(plan: HandoverPlan, result: FedResult, gate: GateDecision) -> dict[str, Any]:
    return {
        "source": "federation",
        "parent_version": plan.parent_version,
        "federation_run_id": plan.run_id,
        "flower_run_id": plan.flower_run_id,
        "strategy": plan.strategy,
        "regions": list(result.regions),
        "round": len(result.rounds),
        "metrics": dict(result.final_metrics),
        "parent_metrics": dict(result.initial_metrics),
        "gate": gate.as_dict(),
        "privacy": dict(result.privacy),
        **plan.extra_lineage,
    }


def register_result(
    registry: RegistryService, artifacts_dir: Path, plan: HandoverPlan, result: FedResult, gate: GateDecision
) -> ModelVersionInfo:
    """Register the global model as a new version of ``plan.model_name``; HandoverError if it cannot be."""
    from shared.models import CheckpointError, load_checkpoint, save_checkpoint

    if result.global_checkpoint is None or not Path(result.global_checkpoint).is_file():
        raise HandoverError(f"the run left no global model (expected {result.global_checkpoint})")
    version = new_version_name(plan.parent_version, plan.run_id)
    try:
        registry.get_version(plan.model_name, version)
        raise HandoverError(f"{plan.model_name}:{version} is already registered; nothing was changed")
    except NotFound:
        pass
    try:
        ckpt = load_checkpoint(Path(result.global_checkpoint))
    except CheckpointError as exc:
        raise HandoverError(f"the global model {result.global_checkpoint} is unusable: {exc}") from None
    lineage = lineage_of(plan, result, gate)
    numeric = {k: float(v) for k, v in result.final_metrics.items() if _number(result.final_metrics, k) is not None}
    meta = ckpt.meta.model_copy(
        update={"name": plan.model_name, "version": version, "parent_version": plan.parent_version, "metrics": numeric}
    )
    with tempfile.TemporaryDirectory(prefix="edgefed-handover-") as tmp_name:
        tmp = Path(tmp_name)
        source = tmp / "global.pt"
        save_checkpoint(source, meta, ckpt.model)
        try:
            if plan.kind == "cloud":
                return _register(registry, "checkpoint", source.read_bytes(), lineage)
            return _register_edge(registry, artifacts_dir, plan, version, source, tmp, lineage)
        except HubServiceError as exc:
            raise HandoverError(f"registering {plan.model_name}:{version} failed: {exc}") from None


def _register_edge(
    registry: RegistryService,
    artifacts_dir: Path,
    plan: HandoverPlan,
    version: str,
    source: Path,
    tmp: Path,
    lineage: dict[str, Any],
) -> ModelVersionInfo:
    from cloud_hub.factory.compress import CompressionError, compress_checkpoint, public_key_path
    from shared.bundle import pack_bundle

    try:
        bundle = compress_checkpoint(
            source,
            tmp / "bundle",
            plan.signing_key,
            name=plan.model_name,
            version=version,
            parent_version=plan.parent_version,
            max_drop_pt=plan.max_drop_pt,
            limit=plan.reference_limit,
            latency_runs=50,
            federation_round=f"run {plan.run_id} (Flower run {plan.flower_run_id})",
        )
    except (CompressionError, KeyError, ValueError, OSError) as exc:  # gate, unknown task, data missing
        raise HandoverError(f"compressing the global model failed: {exc}") from None
    archive = pack_bundle(bundle.path)
    # The source checkpoint goes in first: the registry removes the whole version directory when
    # registration fails, so a refused bundle leaves no orphan behind either.
    version_dir = artifacts_dir / plan.model_name / version
    version_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, version_dir / SOURCE_FILE)
    try:
        return _register(registry, "bundle", archive, lineage)
    except HubServiceError as exc:
        shutil.rmtree(version_dir, ignore_errors=True)
        if "trusts no signing keys" in str(exc) or "signature" in str(exc):
            raise HandoverError(
                f"the hub does not trust its own signing key: put {public_key_path(plan.signing_key)} among "
                f"its trusted keys ({exc})"
            ) from None
        raise
    except BaseException:
        shutil.rmtree(version_dir, ignore_errors=True)
        raise


def _register(registry: RegistryService, what: str, data: bytes, lineage: dict[str, Any]) -> ModelVersionInfo:
    register = registry.register_checkpoint if what == "checkpoint" else registry.register_bundle
    return register(data, lineage=json_safe(lineage))


def json_safe(value: Any) -> Any:
    """NaN and infinities (a region without labelled cases reports NaN) become None: JSON has neither."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value

