"""PyTorch reference networks and their checkpoints (cloud side only: imports torch)."""

from shared.models.checkpoint import Checkpoint, CheckpointError, CheckpointMeta, load_checkpoint, save_checkpoint
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
