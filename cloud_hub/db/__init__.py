"""The hub's database: typed ORM rows, engine/session setup and Alembic migrations."""

# Every row module is imported so Base.metadata is complete (Alembic and the schema check need it).
from cloud_hub.db import federation, fleet, rollouts  # noqa: F401
from cloud_hub.db.models import Base, DeviceRow, ModelRow, ModelVersionRow
from cloud_hub.db.session import Database, upgrade_to_head

__all__ = ["Base", "Database", "DeviceRow", "ModelRow", "ModelVersionRow", "upgrade_to_head"]
