"""Durable outbox: escalations the hub did not answer in time, kept on disk and sent again later.

The caller already has the edge's answer (``edge-fallback``); the outbox makes sure the hub still
sees the case, for its statistics and for federated fine-tuning on regional hard cases. Items keep
their request id, so a re-send that crosses a late answer is deduplicated by the hub's idempotency
key; an item leaves the outbox only when the hub has answered it (successfully or with an error).

SQLite (standard library, one file under the data directory) survives agent restarts and power
loss; the outbox is bounded and drops its oldest cases first, counting and logging what it drops.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edge_agent.breaker import CircuitBreaker
from edge_agent.escalation import CloudAnswer, EscalationClient
from edge_agent.sqlite_wal import open_wal

__all__ = ["Outbox", "OutboxItem", "OutboxSender"]

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL UNIQUE,
    payload BLOB NOT NULL,
    queued_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0
)
"""


@dataclass(frozen=True)
class OutboxItem:
    request_id: str
    payload: bytes
    queued_at: float
    attempts: int


class Outbox:
    """A bounded FIFO of encoded escalation requests in one SQLite file; thread-safe."""

    def __init__(self, path: Path, *, max_items: int = 10_000) -> None:
        if max_items < 1:
            raise ValueError(f"outbox max_items must be >= 1, got {max_items}")
        self.path = Path(path)
        self.max_items = max_items
        self.dropped = 0
        self.delivered = 0
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def open(self) -> Outbox:
        self._db = open_wal(self.path, _SCHEMA)
        return self

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def put(self, request_id: str, payload: bytes) -> None:
        """Queue one request (a second put of the same id is ignored); drops the oldest when full."""
        with self._lock:
            db = self._conn()
            db.execute(
                "INSERT OR IGNORE INTO outbox (request_id, payload, queued_at) VALUES (?, ?, ?)",
                (request_id, payload, time.time()),
            )
            (count,) = db.execute("SELECT COUNT(*) FROM outbox").fetchone()
            excess = count - self.max_items
            if excess > 0:
                db.execute("DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox ORDER BY seq LIMIT ?)", (excess,))
                self.dropped += excess
                log.warning("outbox full (%d cases): dropped the %d oldest", self.max_items, excess)

    def oldest(self, limit: int) -> list[OutboxItem]:
        with self._lock:
            rows = (
                self._conn()
                .execute(
                    "SELECT request_id, payload, queued_at, attempts FROM outbox ORDER BY seq LIMIT ?",
                    (limit,),
                )
                .fetchall()
            )
        return [OutboxItem(r[0], bytes(r[1]), r[2], r[3]) for r in rows]

    def remove(self, request_id: str) -> bool:
        """Forget a case the hub has answered; True if it was still queued."""
        return self.take(request_id) is not None

    def take(self, request_id: str) -> bytes | None:
        """Remove a queued case and return its payload; None if it is not (or no longer) queued.

        This is the at-most-once gate for answers: of two answers to the same case (a late one and a
        re-send's, or a duplicate), only the first finds the row.
        """
        with self._lock:
            db = self._conn()
            row = db.execute("SELECT payload FROM outbox WHERE request_id = ?", (request_id,)).fetchone()
            if row is None:
                return None
            db.execute("DELETE FROM outbox WHERE request_id = ?", (request_id,))
            self.delivered += 1
            return bytes(row[0])

    def mark_attempt(self, request_id: str) -> None:
        with self._lock:
            self._conn().execute("UPDATE outbox SET attempts = attempts + 1 WHERE request_id = ?", (request_id,))

    def __len__(self) -> int:
        with self._lock:
            (count,) = self._conn().execute("SELECT COUNT(*) FROM outbox").fetchone()
        return int(count)

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError(f"outbox {self.path} is not open; call open() first")
        return self._db


class OutboxSender:
    """A background thread that re-sends queued escalations, oldest first, while the broker is up.

    After a round in which nothing was answered it waits longer each time (``idle_s`` doubling up to
    ``max_backoff_s``); a reconnection (``kick``) or an answered round resets the wait. While the
    circuit breaker is open it does not send at all; in half-open its round is the probe.
    """

    def __init__(
        self,
        outbox: Outbox,
        escalator: EscalationClient,
        *,
        timeout_s: float,
        batch: int = 20,
        idle_s: float = 1.0,
        max_backoff_s: float = 30.0,
        breaker: CircuitBreaker | None = None,
        on_delivered: Callable[[bytes, CloudAnswer], None] | None = None,
    ) -> None:
        self.outbox = outbox
        self.escalator = escalator
        self.timeout_s = timeout_s
        self.batch = batch
        self.idle_s = idle_s
        self.max_backoff_s = max(max_backoff_s, idle_s)
        self.breaker = breaker
        self.on_delivered = on_delivered
        self.rounds = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="outbox-sender", daemon=True)
        self._thread.start()

    def kick(self) -> None:
        """Look at the outbox now (after a reconnect, or when a case was queued)."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(self.timeout_s + 5.0)
            self._thread = None

    async def drain_once(self) -> int:
        """Send one batch concurrently; remove each item the hub answered. Returns how many were."""
        items = self.outbox.oldest(self.batch)
        if self.breaker is not None and self.breaker.state == "half-open":
            items = items[:1]  # one probe, not a batch that would all time out again
        self.rounds += 1
        answers = await asyncio.gather(
            *(self.escalator.send(item.request_id, item.payload, self.timeout_s) for item in items)
        )
        answered = 0
        for item, answer in zip(items, answers, strict=True):
            if self.breaker is not None:
                self.breaker.record(answer is not None, answer.round_trip_ms if answer else None)
            if answer is None:
                self.outbox.mark_attempt(item.request_id)
                continue
            answered += 1
            payload = self.outbox.take(item.request_id)
            if payload is not None and self.on_delivered is not None:
                try:
                    self.on_delivered(payload, answer)
                except Exception:  # the case is delivered; only its learning record is lost
                    log.exception("recording the answer to queued case %s failed", item.request_id)
        return answered

    def _ready(self) -> bool:
        if not self.escalator.connected or len(self.outbox) == 0:
            return False
        return self.breaker is None or self.breaker.state != "open"

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        wait = self.idle_s
        try:
            while not self._stop.is_set():
                if self._ready():
                    try:
                        if loop.run_until_complete(self.drain_once()) > 0:
                            wait = self.idle_s
                            continue
                        wait = min(self.max_backoff_s, wait * 2)
                    except Exception:  # a bug here must not end the thread: the cases stay on disk
                        log.exception("outbox round failed; retrying later")
                if self._wake.wait(wait):
                    wait = self.idle_s
                self._wake.clear()
        finally:
            loop.close()
