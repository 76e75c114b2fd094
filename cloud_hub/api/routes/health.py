"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from cloud_hub.api.deps import ServicesDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is alive and serving HTTP."""
    return {"status": "alive"}


@router.get("/readyz")
async def readyz(services: ServicesDep) -> JSONResponse:
    """200 when the database answers, the broker is connected and a cloud model is loaded; else 503."""
    report = await run_in_threadpool(services.readiness)
    return JSONResponse(report, status_code=200 if report["ready"] else 503)


@router.get("/metrics")
def metrics(services: ServicesDep) -> Response:
    body, content_type = services.metrics.render()
    return Response(body, media_type=content_type)
