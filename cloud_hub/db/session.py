"""Engine and session setup, and the schema upgrade the hub runs at every start."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DataError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from cloud_hub.errors import InvalidInput

__all__ = ["Database", "MIGRATIONS_DIR", "make_engine", "schema_revisions", "upgrade_to_head", "wait_for_head"]

MIGRATIONS_DIR = Path(__file__).with_name("migrations")


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL, a busy timeout and enforced foreign keys."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    kwargs: dict[str, Any] = {"connect_args": {"check_same_thread": False, "timeout": 30}}
    in_memory = parsed.database in (None, "", ":memory:")
    if in_memory:
        kwargs["poolclass"] = StaticPool
    else:
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, **kwargs)

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        # WAL lets the REST threads read while the activity flusher writes.
        if not in_memory:
            cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    return engine


def upgrade_to_head(engine: Engine) -> None:
    """Apply every Alembic migration not yet applied (no alembic.ini needed)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def schema_revisions(engine: Engine) -> tuple[set[str], set[str]]:
    """(revisions the database is at, head revisions of the migrations in this code)."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    heads = set(ScriptDirectory.from_config(cfg).get_heads())
    with engine.connect() as conn:
        current = set(MigrationContext.configure(conn).get_current_heads())
    return current, heads


def wait_for_head(engine: Engine, timeout: float, interval: float = 0.5) -> None:
    """Wait until another process (the API hub) migrated the database to this code's head.

    Never migrates. Raises RuntimeError naming what the database is at after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            current, heads = schema_revisions(engine)
            if current == heads:
                return
            state = f"at {sorted(current) or 'no revision'}, this code needs {sorted(heads)}"
        except Exception as exc:  # not reachable yet, or no alembic table yet: keep waiting
            state = f"not readable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        if time.monotonic() >= deadline:
            raise RuntimeError(
                f"database schema is {state} after {timeout:.0f} s; start `edgefed hub serve` "
                "(it migrates) on the same database first"
            )
        time.sleep(interval)


class Database:
    """The hub's database; ``open()`` connects and migrates, the constructor does no I/O."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._engine: Engine | None = None
        self._sessions: sessionmaker[Session] | None = None

    def open(self, *, migrate: bool = True, wait_s: float = 0.0) -> Database:
        """Connect; migrate to head, or (``migrate=False``) wait up to ``wait_s`` for another process to."""
        self._engine = make_engine(self.url)
        if migrate:
            upgrade_to_head(self._engine)
        else:
            wait_for_head(self._engine, wait_s)
        self._sessions = sessionmaker(self._engine, expire_on_commit=False)
        return self

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise RuntimeError("database is not open; call Database.open() first")
        return self._engine

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session in one transaction: committed on success, rolled back on any exception.

        A value the database itself refuses (PostgreSQL: a NUL character in text, a string longer than
        its column) becomes InvalidInput naming the problem, like any other bad input."""
        if self._sessions is None:
            raise RuntimeError("database is not open; call Database.open() first")
        try:
            with self._sessions.begin() as session:
                yield session
        except DataError as exc:
            reason = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else "invalid value"
            raise InvalidInput(f"the database refused a value: {reason}") from None

    def ping(self) -> bool:
        """True when a trivial query succeeds."""
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            return True
        except Exception:  # any driver error means "not reachable"; readyz reports it
            return False

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
            self._sessions = None
