"""Rollouts: canary, waves, gates, decisions."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/api/v1/rollouts", tags=["rollouts"])
