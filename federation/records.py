"""Model weights as a Flower ``ArrayRecord`` and back (named numpy arrays, order kept).

The weights travel packed: one flat array whose key carries the layout (``edgefed.packed.v1:`` and
the names, shapes and dtypes as JSON). Flower moves every array of a message as separate objects,
each pulled and pushed with its own HTTP request at every hop (ServerApp → SuperLink → SuperNode →
ClientApp and back), so a 26-tensor network cost ~50 requests per hop and message; packed, it is a
handful. The strategies are unaffected: FedAvg, FedProx, FedAdam, FedAvgM, the DP wrappers and the
robust aggregators all work element-wise (or on the global L2 norm, which packing preserves) and
keep the keys of the records they aggregate. ``from_record`` also reads unpacked records.
"""

from __future__ import annotations

import json

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

__all__ = ["to_record", "from_record", "PACKED_PREFIX", "BUFFERS_KEY", "buffers_to_config", "buffers_from_config",
           "average_buffers"]

PACKED_PREFIX = "edgefed.packed.v1:"


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """One flat array (float32 when every array is float32, else float64) under a self-describing key."""
    values = [np.asarray(v) for v in arrays.values()]
    if not values:
        return ArrayRecord(array_dict={})
    kind = np.float32 if all(v.dtype == np.float32 for v in values) else np.float64
    layout = [[name, list(v.shape), v.dtype.str] for name, v in zip(arrays, values, strict=True)]
    flat = np.concatenate([v.astype(kind, copy=False).ravel() for v in values])
    return ArrayRecord(array_dict={PACKED_PREFIX + json.dumps(layout, separators=(",", ":")): Array(flat)})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    keys = list(record.keys())
    if len(keys) == 1 and keys[0].startswith(PACKED_PREFIX):
        layout = json.loads(keys[0][len(PACKED_PREFIX):])
        flat = record[keys[0]].numpy().ravel()
        sizes = [int(np.prod(shape, dtype=np.int64)) for _name, shape, _dtype in layout]
        if sum(sizes) != flat.size:
            raise ValueError(f"packed weights hold {flat.size} values; their layout describes {sum(sizes)}")
        out, pos = {}, 0
        for (name, shape, dtype), n in zip(layout, sizes, strict=True):
            out[name] = flat[pos : pos + n].reshape(shape).astype(np.dtype(dtype), copy=True)
            pos += n
        return out
    return dict(zip(keys, record.to_numpy_ndarrays(), strict=True))


BUFFERS_KEY = "buffers"
"""The ConfigRecord that carries a model's buffers (BatchNorm running statistics) next to, not in,
the ArrayRecord that the strategy aggregates (``federation.server_app``)."""


def buffers_to_config(arrays: dict[str, np.ndarray]) -> ConfigRecord:
    """Named arrays as a ConfigRecord: the packed layout and the values' bytes."""
    record = to_record(arrays)
    (key,) = record.keys()
    flat = record[key].numpy()
    return ConfigRecord({"layout": key, "values": flat.tobytes(), "dtype": flat.dtype.str})


def buffers_from_config(config: ConfigRecord) -> dict[str, np.ndarray]:
    flat = np.frombuffer(bytes(config["values"]), dtype=np.dtype(str(config["dtype"])))  # type: ignore[arg-type]
    return from_record(ArrayRecord(array_dict={str(config["layout"]): Array(flat.copy())}))


def average_buffers(parts: list[tuple[dict[str, np.ndarray], float]]) -> dict[str, np.ndarray]:
    """Example-weighted mean of each named array (FedAvg's rule), in the first part's dtypes."""
    total = sum(w for _, w in parts)
    if not parts or total <= 0:
        raise ValueError("no weighted buffers to average")
    first = parts[0][0]
    return {k: (sum(p[k].astype(np.float64) * w for p, w in parts) / total).astype(v.dtype) for k, v in first.items()}
