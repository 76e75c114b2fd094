"""federation.records: weights packed into one Flower array (fewer objects per message), buffers beside it."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from federation.records import (
    PACKED_PREFIX,
    average_buffers,
    buffers_from_config,
    buffers_to_config,
    from_record,
    to_record,
)


def _arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"conv.weight": rng.random((4, 1, 3, 3), dtype=np.float32), "conv.bias": rng.random(4, dtype=np.float32),
            "scale": np.array(2.5, dtype=np.float32)}


def test_packed_round_trip_keeps_names_order_shapes_and_dtypes() -> None:
    arrays = _arrays()
    record = to_record(arrays)
    (key,) = record.keys()  # one array, so Flower moves one object instead of one per tensor
    assert key.startswith(PACKED_PREFIX) and record[key].numpy().size == 36 + 4 + 1
    back = from_record(record)
    assert list(back) == list(arrays)
    for k, v in arrays.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and np.array_equal(back[k], v)
    mixed = {**arrays, "f64": np.arange(3, dtype=np.float64) / 3}
    assert np.array_equal(from_record(to_record(mixed))["f64"], mixed["f64"])  # float64 kept exact


def test_unpacked_records_still_read_and_a_bad_layout_is_refused() -> None:
    arrays = _arrays()
    plain = ArrayRecord(array_dict={k: Array(v) for k, v in arrays.items()})
    assert all(np.array_equal(from_record(plain)[k], v) for k, v in arrays.items())
    key = PACKED_PREFIX + '[["a",[2,2],"<f4"]]'
    with pytest.raises(ValueError, match="layout describes 4"):
        from_record(ArrayRecord(array_dict={key: Array(np.zeros(3, np.float32))}))


def test_a_weighted_mean_of_packed_records_is_the_weighted_mean_of_each_tensor() -> None:
    a, b = _arrays(), {k: v * 3 for k, v in _arrays().items()}
    flat = (to_record(a)[next(iter(to_record(a).keys()))].numpy() * 1 +
            to_record(b)[next(iter(to_record(b).keys()))].numpy() * 3) / 4
    mean = from_record(ArrayRecord(array_dict={next(iter(to_record(a).keys())): Array(flat.astype(np.float32))}))
    for k in a:
        assert np.allclose(mean[k], (a[k] + 3 * b[k]) / 4)


def test_buffers_travel_as_config_and_average_by_case_count() -> None:
    bufs = {"bn.running_mean": np.arange(3, dtype=np.float32), "bn.running_var": np.ones(3, np.float32)}
    back = buffers_from_config(buffers_to_config(bufs))
    assert all(np.array_equal(back[k], v) and back[k].dtype == v.dtype for k, v in bufs.items())
    avg = average_buffers([(bufs, 1.0), ({k: v * 3 for k, v in bufs.items()}, 3.0)])
    assert np.allclose(avg["bn.running_var"], 2.5) and avg["bn.running_var"].dtype == np.float32
    with pytest.raises(ValueError, match="no weighted"):
        average_buffers([])
