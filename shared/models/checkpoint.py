"""PyTorch checkpoints of the project's networks: weights plus the metadata to rebuild and feed them.

A checkpoint is a ``torch.save`` of ``{"meta": CheckpointMeta as dict, "state_dict": ...}``.
It holds only plain types and tensors, so it loads with ``weights_only=True`` (no pickle code).
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.bundle.manifest import InputSpec
from shared.models.registry import build_model

__all__ = ["CHECKPOINT_FORMAT", "CheckpointError", "CheckpointMeta", "Checkpoint", "save_checkpoint", "load_checkpoint"]

CHECKPOINT_FORMAT = "edgefed.checkpoint/v1"


class CheckpointError(ValueError):
    """A checkpoint file is not readable or does not describe a known network."""


class CheckpointMeta(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: str = CHECKPOINT_FORMAT
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    version: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
    parent_version: str | None = None
    role: Literal["edge", "cloud"]
    task: str
    arch: str
    arch_kwargs: dict[str, Any] = Field(default_factory=dict)
    labels: list[str]
    input: InputSpec
    metrics: dict[str, float] = Field(default_factory=dict)
    created_at: str = ""


@dataclass
class Checkpoint:
    meta: CheckpointMeta
    model: torch.nn.Module
    sha256: str


def save_checkpoint(path: Path, meta: CheckpointMeta, model: torch.nn.Module) -> str:
    """Write the checkpoint; return its SHA-256."""
    buf = io.BytesIO()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"meta": meta.model_dump(mode="json"), "state_dict": state}, buf)
    data = buf.getvalue()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def load_checkpoint(source: Path | bytes, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load and rebuild a checkpoint's network in eval mode; raise ``CheckpointError`` if unusable."""
    data = Path(source).read_bytes() if isinstance(source, (str, Path)) else bytes(source)
    try:
        raw = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt or foreign file
        raise CheckpointError(f"not a readable edgefed checkpoint: {type(exc).__name__}: {exc}") from None
    if not isinstance(raw, dict) or "meta" not in raw or "state_dict" not in raw:
        raise CheckpointError("checkpoint lacks 'meta' and 'state_dict'; it was not written by edgefed")
    try:
        meta = CheckpointMeta.model_validate(raw["meta"])
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(map(str, err["loc"]))
        raise CheckpointError(f"checkpoint metadata invalid at {where}: {err['msg']}") from None
    if meta.format != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint format {meta.format!r} is not {CHECKPOINT_FORMAT!r}")
    try:
        model = build_model(meta.arch, **meta.arch_kwargs)
        model.load_state_dict(raw["state_dict"])
    except (KeyError, RuntimeError, TypeError) as exc:
        raise CheckpointError(f"checkpoint weights do not fit architecture {meta.arch!r}: {exc}") from None
    model.eval()
    return Checkpoint(meta=meta, model=model.to(map_location), sha256=hashlib.sha256(data).hexdigest())
