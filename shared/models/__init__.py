"""PyTorch reference networks and their checkpoints (cloud side only: imports torch).

Names load on first use (PEP 562), so ``shared.models.networks``/``registry`` import with torch alone:
the checkpoint module also needs pydantic, which a GPU benchmark box may not have.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shared.models.checkpoint import (
        Checkpoint,
        CheckpointError,
        CheckpointMeta,
        load_checkpoint,
        save_checkpoint,
    )
    from shared.models.registry import ARCHITECTURES, build_model

__all__ = [
    "ARCHITECTURES",
    "Checkpoint",
    "CheckpointError",
    "CheckpointMeta",
    "build_model",
    "load_checkpoint",
    "save_checkpoint",
]

_HOME = {
    "ARCHITECTURES": "registry",
    "build_model": "registry",
    "Checkpoint": "checkpoint",
    "CheckpointError": "checkpoint",
    "CheckpointMeta": "checkpoint",
    "load_checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint",
}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value
