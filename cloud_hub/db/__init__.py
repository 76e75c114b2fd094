"""The hub's database: typed ORM rows, engine/session setup and Alembic migrations."""

from cloud_hub.db.models import Base, DeviceRow, ModelRow, ModelVersionRow
from cloud_hub.db.session import Database, upgrade_to_head

__all__ = ["Base", "Database", "DeviceRow", "ModelRow", "ModelVersionRow", "upgrade_to_head"]
