"""The contract between the hub (which schedules federation runs) and the Flower side (which runs them).

The hub builds a :class:`FedRunSpec`, submits it through :class:`federation.runner.FederationClient`
to a SuperLink, polls :class:`FedRunState`, and once the run finished reads a :class:`FedResult` from
the run's output directory (the SuperLink runs next to the hub and shares its disk).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

__all__ = ["FedRunSpec", "FedRunState", "FedResult", "RunStatus"]

RunStatus = Literal["queued", "running", "finished", "failed"]


@dataclass
class FedRunSpec:
    """Everything one federation run needs; JSON-serialisable via :meth:`to_dict`."""

    model_name: str
    kind: Literal["edge", "cloud"]  # which network is trained: the deployed edge model by default
    task: str  # shared.data task name (elpv, elpv4, fmnist, ...): labels and the reference validation set
    initial_checkpoint: Path  # shared.models checkpoint of the version the run starts from
    output_dir: Path  # the ServerApp writes global.pt and result.json here
    parent_version: str = ""
    strategy: str = "fedavg"  # fedavg | fedprox | fedadam | fedavgm
    strategy_params: dict[str, Any] = field(default_factory=dict)
    rounds: int = 3
    local_epochs: int = 1
    lr: float = 1e-3
    batch_size: int = 32
    soft_weight: float = 0.5  # weight of the cloud's soft targets vs inspector-confirmed hard labels
    min_available: int = 1
    min_fit: int = 1
    fraction_fit: float = 1.0
    round_timeout_s: float = 300.0
    differential_privacy: dict[str, Any] | None = None  # e.g. {"clipping": "fixed"|"adaptive", "noise_multiplier": ..}
    # SecAgg+ on (shared.federation_api.SecAggSettings keys; {} = Flower's defaults), e.g. {"num_shares": 3}
    secagg: dict[str, Any] | None = None
    reference_limit: int | None = None  # evaluate on a slice of the reference set (tests)
    # Added by the Flower side (all optional, defaults keep the behaviour above):
    reference_data: Path | None = None  # .npz with x (float32 N×C×H×W model inputs) and y; replaces the task's set
    fraction_evaluate: float = 1.0  # share of SuperNodes asked to evaluate the global model on their own data
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["initial_checkpoint"] = str(self.initial_checkpoint)
        d["output_dir"] = str(self.output_dir)
        d["reference_data"] = None if self.reference_data is None else str(self.reference_data)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FedRunSpec:
        """The inverse of :meth:`to_dict`; unknown keys raise ``TypeError`` naming them."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise TypeError(f"FedRunSpec has no field(s) {', '.join(unknown)}")
        d = dict(d)
        for key in ("initial_checkpoint", "output_dir", "reference_data"):
            if d.get(key) is not None:
                d[key] = Path(d[key])
        return cls(**d)


@dataclass
class FedRunState:
    run_id: str  # Flower's run id
    status: RunStatus
    reason: str = ""  # why it failed, in words


@dataclass
class FedResult:
    """What a finished run left in its output directory (``result.json`` + ``global.pt``)."""

    status: RunStatus
    global_checkpoint: Path | None
    rounds: list[dict[str, Any]]  # per round: {"round": n, "val_accuracy": .., "val_loss": .., "clients": .., ...}
    regions: list[str]  # regions whose SuperNodes took part
    initial_metrics: dict[str, Any]  # reference-set metrics of the starting model
    final_metrics: dict[str, Any]  # reference-set metrics of the global model
    privacy: dict[str, Any] = field(default_factory=dict)  # what DP / SecAgg+ settings were applied
    reason: str = ""
    wall_s: float = 0.0
    run_id: str = ""  # Flower's run id (added by the Flower side)
