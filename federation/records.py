"""Model weights as Flower ``ArrayRecord``s and back (named numpy arrays, order kept)."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

__all__ = ["to_record", "from_record"]


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(array_dict={k: Array(np.asarray(v)) for k, v in arrays.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return dict(zip(record.keys(), record.to_numpy_ndarrays(), strict=True))
