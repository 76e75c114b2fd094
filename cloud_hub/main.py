"""Assembles the hub's FastAPI apps: services, routers, error handlers, HTTP metrics, request ids.

``create_app`` is the API hub (``hub serve``); ``create_worker_app`` is a hub worker (``hub worker``):
the same services in the worker role, with only /healthz, /readyz and /metrics over HTTP.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Literal

from fastapi import FastAPI, Request, Response
from fastapi.concurrency import run_in_threadpool

from cloud_hub.api.errors import install_error_handlers
from cloud_hub.api.routes import devices, escalations, federation, health, keys, models, predict, rollouts, tokens
from cloud_hub.config import HubSettings
from cloud_hub.services import HubServices
from shared.logs import new_request_id, request_context

__all__ = ["REQUEST_ID_HEADER", "create_app", "create_worker_app"]

REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def create_app(settings: HubSettings) -> FastAPI:
    """A hub app; its services start with the app's lifespan and stop with it."""
    return _build_app(settings, "api")


def create_worker_app(settings: HubSettings) -> FastAPI:
    """A hub worker: answers escalations over MQTT; HTTP serves only health and metrics."""
    return _build_app(settings, "worker")


def _build_app(settings: HubSettings, role: Literal["api", "worker"]) -> FastAPI:
    services = HubServices(settings, role=role)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(services.start)
        try:
            yield
        finally:
            await run_in_threadpool(services.stop)

    app = FastAPI(
        title="edgefed hub" if role == "api" else "edgefed hub worker",
        description="Model registry, fleet, escalations and full-model inference.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.services = services
    install_error_handlers(app)
    routers = (health, keys, models, devices, predict, tokens, escalations, federation, rollouts)
    for module in routers if role == "api" else (health,):
        app.include_router(module.router)

    @app.middleware("http")
    async def count_requests(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            # The route template, not the raw path, keeps label cardinality bounded.
            route = getattr(request.scope.get("route"), "path", "unmatched")
            services.metrics.http_requests.labels(request.method, route, str(status)).inc()

    @app.middleware("http")
    async def request_id(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        # The caller's X-Request-ID (when well-formed) or a new one: in every log line of this request
        # and echoed on the response, so one id follows a call across processes.
        given = request.headers.get(REQUEST_ID_HEADER, "")
        rid = given if _REQUEST_ID.match(given) else new_request_id()
        request.state.request_id = rid  # for the 500 handler, which runs outside this middleware
        with request_context(rid):
            response = await call_next(request)
        response.headers[REQUEST_ID_HEADER] = rid
        return response

    return app
