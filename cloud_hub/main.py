"""Assembles the hub's FastAPI app: services, routers, error handlers, HTTP metrics."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.concurrency import run_in_threadpool

from cloud_hub.api.errors import install_error_handlers
from cloud_hub.api.routes import devices, escalations, federation, health, keys, models, predict, rollouts, tokens
from cloud_hub.config import HubSettings
from cloud_hub.services import HubServices

__all__ = ["create_app"]


def create_app(settings: HubSettings) -> FastAPI:
    """A hub app; its services start with the app's lifespan and stop with it."""
    services = HubServices(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(services.start)
        try:
            yield
        finally:
            await run_in_threadpool(services.stop)

    app = FastAPI(
        title="edgefed hub",
        description="Model registry, fleet, escalations and full-model inference.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.services = services
    install_error_handlers(app)
    for module in (health, keys, models, devices, predict, tokens, escalations, federation, rollouts):
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

    return app
