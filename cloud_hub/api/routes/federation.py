"""Federation rounds (runs) and schedules."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/api/v1/federation", tags=["federation"])
