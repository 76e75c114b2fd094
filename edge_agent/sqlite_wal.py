"""The agent's on-disk queues and stores: one SQLite file each, in WAL mode."""

from __future__ import annotations

import sqlite3
from pathlib import Path

__all__ = ["open_wal"]


def open_wal(path: Path, schema: str) -> sqlite3.Connection:
    """Open (creating) ``path`` in autocommit WAL mode and apply ``schema`` (idempotent DDL).

    WAL + synchronous=NORMAL: a commit survives a process crash without an fsync per write.
    The connection is shared across threads; callers serialise access with their own lock.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    # Write-mostly stores: a 256 KiB page cache instead of SQLite's 2 MiB default keeps the agent's RSS down.
    db.execute("PRAGMA cache_size=-256")
    db.executescript(schema)
    return db
