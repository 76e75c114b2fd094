"""The local learning store: hard cases and confirmed labels that stay on this machine.

One SQLite file (WAL) under the data directory, one row per case (``request_id``):

========================  =====================================================================
column                    meaning
========================  =====================================================================
request_id                the agent's id for the case (also the escalation's idempotency key)
created_at / updated_at   Unix seconds
task, model_name/version  the edge model that saw the case
input                     the model input, a ``shared.codec`` frame (float32 N=1 tensor)
edge_label, edge_conf     the edge model's answer
cloud_label               the hub's label, NULL if never answered
cloud_probs               the hub's class probabilities (soft targets), float32 bytes, or NULL
cloud_model               ``name:version`` of the hub's model
confirmed_label           an inspector's label from ``POST /v1/feedback``, or NULL
metadata                  the *redacted* metadata, JSON
========================  =====================================================================

The federation layer reads it with ``read_cases(path)`` (no agent needed). The store is bounded by
``max_items`` (oldest rows go first) and ``retention_s`` (older rows go), both applied as rows are
written; every eviction is counted and logged.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_agent.sqlite_wal import open_wal
from shared.codec import decode_frame, encode_frame

__all__ = ["LearnedCase", "LearningStore", "read_cases"]

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS cases (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    task TEXT NOT NULL,
    model_name TEXT NOT NULL,
    model_version TEXT NOT NULL,
    input BLOB NOT NULL,
    edge_label INTEGER,
    edge_conf REAL,
    cloud_label INTEGER,
    cloud_probs BLOB,
    cloud_model TEXT,
    confirmed_label INTEGER,
    metadata TEXT NOT NULL DEFAULT '{}'
)
"""
_COLUMNS = (
    "request_id, created_at, task, model_name, model_version, input, edge_label, edge_conf, "
    "cloud_label, cloud_probs, cloud_model, confirmed_label, metadata"
)


@dataclass(frozen=True)
class LearnedCase:
    """One stored case, as the federation layer reads it."""

    request_id: str
    created_at: float
    task: str
    model_name: str
    model_version: str
    input: np.ndarray
    edge_label: int | None
    edge_confidence: float | None
    cloud_label: int | None
    cloud_probabilities: np.ndarray | None
    cloud_model: str | None
    confirmed_label: int | None
    metadata: dict[str, str]

    @property
    def label(self) -> int | None:
        """The best label known: the inspector's, else the cloud's."""
        return self.confirmed_label if self.confirmed_label is not None else self.cloud_label


def _row_to_case(r: tuple) -> LearnedCase:
    probs = None if r[9] is None else np.frombuffer(r[9], dtype=np.float32).copy()
    tensor = decode_frame(bytes(r[5])).tensor
    assert tensor is not None
    return LearnedCase(r[0], r[1], r[2], r[3], r[4], tensor, r[6], r[7], r[8], probs, r[10], r[11], json.loads(r[12]))


class LearningStore:
    """Bounded SQLite store of escalated and confirmed cases; thread-safe. ``open()`` does the I/O."""

    def __init__(self, path: Path, *, max_items: int = 50_000, retention_s: float | None = None) -> None:
        if max_items < 1:
            raise ValueError(f"learning store max_items must be >= 1, got {max_items}")
        self.path = Path(path)
        self.max_items = max_items
        self.retention_s = retention_s
        self.evicted = 0
        self.expired = 0
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def open(self) -> LearningStore:
        self._db = open_wal(self.path, _SCHEMA)
        return self

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def record_case(
        self,
        request_id: str,
        tensor: np.ndarray,
        *,
        task: str,
        model_name: str,
        model_version: str,
        edge_label: int | None,
        edge_confidence: float | None,
        metadata: dict[str, str] | None = None,
    ) -> None:
        """Keep a case's input (idempotent: a second call for the same id changes nothing)."""
        now = time.time()
        frame = encode_frame(0, {}, np.ascontiguousarray(tensor, dtype=np.float32))
        with self._lock:
            self._conn().execute(
                "INSERT OR IGNORE INTO cases (request_id, created_at, updated_at, task, model_name, "
                "model_version, input, edge_label, edge_conf, metadata) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (
                    request_id,
                    now,
                    now,
                    task,
                    model_name,
                    model_version,
                    frame,
                    edge_label,
                    edge_confidence,
                    json.dumps(metadata or {}),
                ),
            )
            self._bound(now)

    def record_cloud(
        self, request_id: str, label: int, probabilities: np.ndarray | None, cloud_model: str | None
    ) -> bool:
        """Attach the hub's answer to a stored case, once; False if unknown or already answered."""
        probs = None if probabilities is None else np.asarray(probabilities, dtype=np.float32).tobytes()
        with self._lock:
            cur = self._conn().execute(
                "UPDATE cases SET cloud_label=?, cloud_probs=?, cloud_model=?, updated_at=? "
                "WHERE request_id=? AND cloud_label IS NULL",
                (label, probs, cloud_model, time.time(), request_id),
            )
            return cur.rowcount == 1

    def confirm(self, request_id: str, label: int) -> bool:
        """Record an inspector's label for a stored case; False if the case is not stored."""
        with self._lock:
            cur = self._conn().execute(
                "UPDATE cases SET confirmed_label=?, updated_at=? WHERE request_id=?",
                (label, time.time(), request_id),
            )
            return cur.rowcount == 1

    def get(self, request_id: str) -> LearnedCase | None:
        with self._lock:
            row = self._conn().execute(f"SELECT {_COLUMNS} FROM cases WHERE request_id=?", (request_id,)).fetchone()
        return None if row is None else _row_to_case(row)

    def __len__(self) -> int:
        with self._lock:
            (n,) = self._conn().execute("SELECT COUNT(*) FROM cases").fetchone()
        return int(n)

    def _bound(self, now: float) -> None:
        db = self._conn()
        if self.retention_s is not None:
            cur = db.execute("DELETE FROM cases WHERE created_at < ?", (now - self.retention_s,))
            if cur.rowcount > 0:
                self.expired += cur.rowcount
                log.info("learning store: %d case(s) older than the retention dropped", cur.rowcount)
        (count,) = db.execute("SELECT COUNT(*) FROM cases").fetchone()
        excess = count - self.max_items
        if excess > 0:
            db.execute("DELETE FROM cases WHERE seq IN (SELECT seq FROM cases ORDER BY seq LIMIT ?)", (excess,))
            self.evicted += excess
            log.warning("learning store full (%d cases): dropped the %d oldest", self.max_items, excess)

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError(f"learning store {self.path} is not open; call open() first")
        return self._db


def read_cases(path: Path, *, labelled_only: bool = True) -> Iterator[LearnedCase]:
    """Every stored case, oldest first (only those with a cloud or confirmed label by default)."""
    db = sqlite3.connect(f"file:{Path(path)}?mode=ro", uri=True)
    try:
        where = " WHERE cloud_label IS NOT NULL OR confirmed_label IS NOT NULL" if labelled_only else ""
        for row in db.execute(f"SELECT {_COLUMNS} FROM cases{where} ORDER BY seq"):
            yield _row_to_case(row)
    finally:
        db.close()
