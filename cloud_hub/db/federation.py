"""ORM rows for federation runs and schedules.

Schema owned by migration; see cloud_hub/db/models.py for Base and UTCDateTime."""

from __future__ import annotations

__all__: list[str] = []
