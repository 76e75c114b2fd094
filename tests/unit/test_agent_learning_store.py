"""The local learning store on a real SQLite file: idempotent writes, once-only answers, bounds."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest

from edge_agent.learning_store import LearningStore, read_cases


def x(v: float) -> np.ndarray:
    return np.full((1, 1, 8, 8), v, dtype=np.float32)


def put(store: LearningStore, rid: str, v: float = 0.1, **meta: str) -> None:
    store.record_case(
        rid, x(v), task="t", model_name="m", model_version="1", edge_label=1, edge_confidence=0.6, metadata=meta
    )


def test_case_cloud_answer_and_confirmation_round_trip(tmp_path: Path) -> None:
    store = LearningStore(tmp_path / "l.sqlite3").open()
    put(store, "a", 0.25, operator="h:abc")
    put(store, "a", 0.99)  # a second record of the same case changes nothing
    assert store.record_cloud("a", 0, np.array([0.9, 0.1], np.float32), "cloud:9") is True
    assert store.record_cloud("a", 1, None, "cloud:9") is False  # applied at most once
    assert store.record_cloud("never", 1, None, None) is False
    put(store, "b")
    assert store.confirm("b", 0) and not store.confirm("nope", 0)
    store.close()
    # The federation layer reads the file without an agent; only labelled cases by default.
    cases = list(read_cases(tmp_path / "l.sqlite3"))
    assert [c.request_id for c in cases] == ["a", "b"]
    a, b = cases
    np.testing.assert_array_equal(a.input, x(0.25))
    assert (a.cloud_label, a.cloud_model, a.label, a.metadata) == (0, "cloud:9", 0, {"operator": "h:abc"})
    np.testing.assert_allclose(a.cloud_probabilities, [0.9, 0.1])
    assert (b.cloud_label, b.confirmed_label, b.label, b.cloud_probabilities) == (None, 0, 0, None)


def test_bounded_by_count_and_retention(tmp_path: Path) -> None:
    store = LearningStore(tmp_path / "l.sqlite3", max_items=3).open()
    for i in range(5):
        put(store, f"c{i}")
    assert len(store) == 3 and store.evicted == 2
    assert store.get("c0") is None and store.get("c4") is not None
    store.close()
    aged = LearningStore(tmp_path / "l.sqlite3", retention_s=60).open()
    db = sqlite3.connect(tmp_path / "l.sqlite3")
    db.execute("UPDATE cases SET created_at = ? WHERE request_id = 'c2'", (time.time() - 3600,))
    db.commit()
    db.close()
    put(aged, "c5")
    assert aged.get("c2") is None and aged.expired == 1 and len(aged) == 3


def test_misuse_is_explained(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_items must be >= 1"):
        LearningStore(tmp_path / "l", max_items=0)
    with pytest.raises(RuntimeError, match="not open"):
        len(LearningStore(tmp_path / "l"))
