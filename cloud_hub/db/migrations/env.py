"""Alembic environment for the hub. Configured in code by ``cloud_hub.db.session.upgrade_to_head``,
which hands over an open connection; ``sqlalchemy.url`` is used only when none is given."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine

from cloud_hub.db.models import Base

config = context.config
target_metadata = Base.metadata


def _run(connection: Connection) -> None:
    # Batch mode lets ALTER-style migrations work on SQLite, which cannot alter columns in place.
    context.configure(
        connection=connection, target_metadata=target_metadata, render_as_batch=True, compare_type=True
    )
    with context.begin_transaction():
        context.run_migrations()


def _run_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    _run_offline()
else:
    given = config.attributes.get("connection")
    if given is not None:
        _run(given)
    else:
        engine = create_engine(config.get_main_option("sqlalchemy.url") or "")
        with engine.connect() as conn:
            _run(conn)
            conn.commit()
        engine.dispose()
