"""Escalation statistics per device, region and model version."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/api/v1/escalations", tags=["escalations"])
