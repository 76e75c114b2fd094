"""A throwaway PostgreSQL cluster for database tests, and ``db_url``, parametrized over SQLite and it.

Load from a test module with ``pytest_plugins = ["tests.postgres_fixtures"]``. ``postgres`` (session)
runs Debian's ``initdb``/``pg_ctl`` (package ``postgresql``, installed by ``make setup``) into a fresh
temporary directory: listening on 127.0.0.1 on a free port, its unix socket in that directory,
fsync off. PostgreSQL refuses to run as root, so under uid 0 the cluster runs as the ``postgres``
system user (``runuser``). It is stopped with ``pg_ctl stop -m fast`` on its own data directory.
Each test that asks for ``db_url`` gets a new empty database (or SQLite file).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from shared.processes import free_port

if TYPE_CHECKING:
    from cloud_hub.db import Database

__all__ = ["PostgresCluster", "find_pg_bin", "postgres", "db_url", "db", "BACKENDS"]

BACKENDS = ["sqlite", "postgresql"]


def find_pg_bin() -> Path:
    """The newest Debian PostgreSQL server binaries directory; a clear error when none is installed."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if not found:
        raise RuntimeError(
            "PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin/initdb); "
            "install Debian's 'postgresql' package (make setup does)"
        )
    return Path(found[-1]).parent


class PostgresCluster:
    """One ``initdb``-made cluster in a temporary directory; ``start()``/``stop()`` by its data dir."""

    def __init__(self, root: Path | None = None) -> None:
        self.bin = find_pg_bin()
        self.root = Path(root or tempfile.mkdtemp(prefix="edgefed-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.user = "postgres" if os.getuid() == 0 else pwd.getpwuid(os.getuid()).pw_name
        self._started = False

    def _run(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bin / argv[0]), *argv[1:]]
        if os.getuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=self.root)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
        return r

    def start(self) -> PostgresCluster:
        if os.getuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", self.user, "--auth=trust", "-E", "UTF8", "--no-sync")
        opts = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=50"
        )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "postgres.log"), "-o", opts, "-w", "start")
        self._started = True
        return self

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database; its SQLAlchemy URL."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user={self.user} dbname=postgres", autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        try:
            if self._started:
                self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
                self._started = False
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join((self.root / "postgres.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """A running throwaway PostgreSQL cluster shared by the session; stopped at its end."""
    cluster = PostgresCluster()
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh empty database URL: a SQLite file, then a new PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'hub.db'}"
    cluster: PostgresCluster = request.getfixturevalue("postgres")
    return cluster.create_database()


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    """The hub's database on ``db_url``, migrated to head, closed after the test."""
    from cloud_hub.db import Database

    database = Database(db_url).open()
    try:
        yield database
    finally:
        database.close()
