"""Architectures by name, so checkpoints can rebuild their network."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from shared.models.networks import CloudCNN, CloudResNet, EdgeCNN

__all__ = ["ARCHITECTURES", "build_model"]

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "edge-cnn": EdgeCNN,
    "cloud-resnet": CloudResNet,
    "cloud-cnn": CloudCNN,
}


def build_model(arch: str, **kwargs: Any) -> nn.Module:
    """Instantiate architecture ``arch``; KeyError names the known ones."""
    try:
        factory = ARCHITECTURES[arch]
    except KeyError:
        raise KeyError(f"unknown architecture {arch!r}; known: {', '.join(sorted(ARCHITECTURES))}") from None
    return factory(**kwargs)
