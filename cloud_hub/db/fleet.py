"""ORM rows for the fleet: API tokens, escalation statistics, stored payloads, telemetry.

Schema owned by migration; see cloud_hub/db/models.py for Base and UTCDateTime."""

from __future__ import annotations

__all__: list[str] = []
