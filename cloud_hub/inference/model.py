"""One cloud model ready to run: a checkpoint's network on its device, with input checks.

Loading also runs one forward pass on the checkpoint's declared input shape, so a checkpoint whose
weights or metadata do not fit its network is refused at push time, not at the first escalation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cloud_hub.errors import InvalidInput, NotFound
from shared.models import Checkpoint, CheckpointError, load_checkpoint

__all__ = ["BadTensor", "UnknownTask", "ModelSpec", "LoadedModel", "load_model"]


class BadTensor(InvalidInput):
    """A tensor does not fit the model's input (shape or dtype)."""

    kind = "bad_shape"


class UnknownTask(NotFound):
    """No cloud model is loaded for the requested task."""

    kind = "unknown_task"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    version: str
    task: str
    labels: tuple[str, ...]
    input_chw: tuple[int, int, int]


class LoadedModel:
    """A network in eval mode on ``device``; ``predict`` maps N×C×H×W float32 to N×K probabilities."""

    def __init__(self, checkpoint: Checkpoint, device: torch.device) -> None:
        meta = checkpoint.meta
        self.meta = meta
        self.spec = ModelSpec(
            name=meta.name,
            version=meta.version,
            task=meta.task,
            labels=tuple(meta.labels),
            input_chw=(meta.input.channels, meta.input.height, meta.input.width),
        )
        self.device = device
        self._net = checkpoint.model

    def check_input(self, tensor: np.ndarray) -> np.ndarray:
        """Return ``tensor`` as contiguous N×C×H×W float32, or raise BadTensor saying what is wrong."""
        if tensor.dtype != np.float32:
            raise BadTensor(
                f"tensor dtype is {tensor.dtype}; model {self._ref} takes float32", kind="bad_dtype"
            )
        if tensor.ndim == 3:
            tensor = tensor[None]
        c, h, w = self.spec.input_chw
        if tensor.ndim != 4 or tuple(tensor.shape[1:]) != (c, h, w) or tensor.shape[0] < 1:
            raise BadTensor(
                f"tensor shape {list(tensor.shape)} does not fit model {self._ref}, which takes N×{c}×{h}×{w}"
            )
        return np.ascontiguousarray(tensor)

    @torch.inference_mode()
    def predict(self, batch: np.ndarray) -> np.ndarray:
        if not batch.flags.writeable:  # frames decode to read-only views; torch wants to own writable memory
            batch = batch.copy()
        x = torch.from_numpy(batch).to(self.device, non_blocking=True)
        return torch.softmax(self._net(x).float(), dim=1).cpu().numpy()

    @property
    def _ref(self) -> str:
        return f"{self.spec.name}:{self.spec.version}"


def load_model(source: Path | bytes, device: str = "cpu") -> LoadedModel:
    """Load a cloud checkpoint onto ``device`` and probe it; raise InvalidInput naming the problem."""
    try:
        ckpt = load_checkpoint(source, map_location=device)
    except CheckpointError as exc:
        raise InvalidInput(f"checkpoint refused: {exc}", kind="bad_checkpoint") from None
    if ckpt.meta.role != "cloud":
        raise InvalidInput(
            f"checkpoint {ckpt.meta.name}:{ckpt.meta.version} has role {ckpt.meta.role!r}; the hub serves "
            "only cloud checkpoints (push edge models as signed bundles)",
            kind="bad_checkpoint",
        )
    model = LoadedModel(ckpt, torch.device(device))
    c, h, w = model.spec.input_chw
    try:
        probs = model.predict(np.zeros((1, c, h, w), dtype=np.float32))
    except RuntimeError as exc:
        raise InvalidInput(
            f"checkpoint {model._ref}: a forward pass on its declared input 1×{c}×{h}×{w} failed: {exc}",
            kind="bad_checkpoint",
        ) from None
    if probs.shape != (1, len(model.spec.labels)):
        raise InvalidInput(
            f"checkpoint {model._ref} outputs {list(probs.shape[1:])} classes per sample but declares "
            f"{len(model.spec.labels)} labels",
            kind="bad_checkpoint",
        )
    return model
