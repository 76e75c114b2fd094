"""The durable outbox on a real SQLite file: order, bound, idempotent puts, survival across reopen."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.outbox import Outbox


def test_fifo_remove_and_attempts(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite3").open()
    for i in range(3):
        box.put(f"r{i}", bytes([i]) * 4)
    box.put("r1", b"again")  # same request id: kept once, first payload wins
    assert len(box) == 3
    assert [(it.request_id, it.payload) for it in box.oldest(2)] == [("r0", b"\0" * 4), ("r1", b"\1" * 4)]
    box.mark_attempt("r0")
    box.mark_attempt("r0")
    assert box.oldest(1)[0].attempts == 2
    box.remove("r0")
    box.remove("never-queued")
    assert [it.request_id for it in box.oldest(10)] == ["r1", "r2"] and box.delivered == 1
    box.close()


def test_bounded_drops_the_oldest(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite3", max_items=3).open()
    for i in range(5):
        box.put(f"r{i}", b"x")
    assert [it.request_id for it in box.oldest(10)] == ["r2", "r3", "r4"]
    assert box.dropped == 2
    box.close()


def test_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite3"
    box = Outbox(path).open()
    box.put("kept", b"payload")
    box.close()
    again = Outbox(path).open()
    assert [(it.request_id, it.payload) for it in again.oldest(5)] == [("kept", b"payload")]
    again.close()


def test_misuse_is_explained(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_items must be >= 1"):
        Outbox(tmp_path / "o.sqlite3", max_items=0)
    with pytest.raises(RuntimeError, match="is not open; call open"):
        len(Outbox(tmp_path / "o.sqlite3"))


def test_take_returns_the_payload_once(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite3").open()
    box.put("a", b"payload-a")
    assert box.take("a") == b"payload-a"
    assert box.take("a") is None and box.remove("a") is False  # a second answer finds nothing
    assert box.delivered == 1 and len(box) == 0
