"""The one place where service errors become HTTP status codes, and where every error body
becomes ``{"detail": "<what was wrong>"}``."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from cloud_hub.errors import (
    Conflict,
    Forbidden,
    HubServiceError,
    InvalidInput,
    NotFound,
    Unauthorized,
    Unavailable,
)
from shared.logs import request_context

__all__ = ["STATUS_BY_ERROR", "install_error_handlers"]

log = logging.getLogger(__name__)

STATUS_BY_ERROR: dict[type[HubServiceError], int] = {
    NotFound: 404,
    Conflict: 409,
    InvalidInput: 400,
    Unauthorized: 401,
    Forbidden: 403,
    Unavailable: 503,
}


def _status(exc: HubServiceError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]  # type: ignore[index]
    return 500


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HubServiceError)
    status = _status(exc)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"detail": str(exc)}, status_code=status, headers=headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(p) for p in err.get("loc", ()))
        problems.append(f"{loc}: {err.get('msg', 'invalid')}")
    return JSONResponse({"detail": "invalid request: " + "; ".join(problems)}, status_code=422)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # A bug, not bad input: say so in the same JSON shape; the traceback goes to the hub's log.
    # This runs outside the request-id middleware: take the id it left in the request state.
    rid = getattr(request.state, "request_id", None)
    with request_context(rid):
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse(
        {"detail": f"internal error ({type(exc).__name__}); see the hub log"},
        status_code=500,
        headers={"X-Request-ID": rid} if rid else None,
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(HubServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected)
    _document_validation_errors(app)


def _document_validation_errors(app: FastAPI) -> None:
    """Make /openapi.json describe the 422 body the hub really sends, ``{"detail": "<message>"}``,
    instead of FastAPI's default list of error objects (clients and schema checks rely on it)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            schemas = schema.get("components", {}).get("schemas", {})
            if "HTTPValidationError" in schemas:
                schemas["HTTPValidationError"] = {
                    "title": "HTTPValidationError",
                    "type": "object",
                    "properties": {"detail": {"type": "string", "title": "Detail"}},
                    "required": ["detail"],
                }
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
