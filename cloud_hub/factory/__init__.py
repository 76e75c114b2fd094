"""The model factory: train the reference pair, compress the edge model to a gated, signed INT8 bundle.

Attributes load lazily: the CLI module of this package is imported by ``edgefed`` at start-up and
must not pull torch or onnxruntime in with it.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "AccuracyGateError",
    "BundleExistsError",
    "CompressionError",
    "QuantSettings",
    "ReferenceModels",
    "TrainResult",
    "build_reference_models",
    "compress_checkpoint",
    "ensure_signing_key",
    "public_key_path",
    "train_models",
]

_WHERE = {
    "AccuracyGateError": "compress",
    "BundleExistsError": "compress",
    "CompressionError": "compress",
    "compress_checkpoint": "compress",
    "ensure_signing_key": "compress",
    "public_key_path": "compress",
    "QuantSettings": "quantize",
    "ReferenceModels": "reference",
    "build_reference_models": "reference",
    "TrainResult": "train",
    "train_models": "train",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
