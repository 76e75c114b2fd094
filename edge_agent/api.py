"""The agent's local HTTP API (loopback by default): the camera line's client talks to this.

- ``POST /v1/infer``: body is one image (``image/png``, ``image/jpeg``), one tensor frame
  (``application/x-edgefed-tensor``, a ``shared.codec`` frame whose tensor matches the input spec,
  N=1), or ``multipart/form-data`` with the image in a ``file`` field. Optional metadata (a JSON object
  of strings) in the ``X-Edgefed-Metadata`` header or a ``metadata`` form field; it is redacted by
  the site's rules before anything leaves the agent.
- ``POST /v1/feedback``: ``{"request_id": ..., "label": 1 | "defect"}``, an inspector's label.
- ``POST /v1/model/rollback``: serve the previous bundle again.
- ``GET /healthz``: 200 with the model version while a model is loaded; ``GET /metrics``: Prometheus.
- ``GET /v1/stats``: request and escalation counters.

Bad input gets a 4xx whose ``detail`` names the problem; nothing else changes. Status codes are
chosen here and only here.

Built on Starlette, not FastAPI: six routes need no dependency injection or generated OpenAPI, and
importing FastAPI costs the agent ~11 MiB of resident memory and ~0.3 s of start-up (P7). Request
bodies are still validated by pydantic models, and errors keep FastAPI's shape (``{"detail": ...}``,
422 for a body that does not fit the model).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, TypeVar

import numpy as np
from pydantic import BaseModel, Field, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from edge_agent.metrics import CONTENT_TYPE as METRICS_TYPE
from edge_agent.metrics import render_metrics
from edge_agent.redaction import RedactionError
from edge_agent.runtime import InputError, ModelError
from edge_agent.service import EdgeService, FeedbackError
from shared.codec import CodecError, decode_frame

__all__ = [
    "IMAGE_TYPES",
    "METADATA_HEADER",
    "TENSOR_CONTENT_TYPE",
    "FeedbackIn",
    "RollbackError",
    "RollbackResult",
    "create_app",
]

TENSOR_CONTENT_TYPE = "application/x-edgefed-tensor"
IMAGE_TYPES = ("image/png", "image/jpeg")
MULTIPART = "multipart/form-data"
METADATA_HEADER = "X-Edgefed-Metadata"


class RollbackError(RuntimeError):
    """There is no previous bundle to go back to, or it no longer verifies or loads; nothing changed."""


class RollbackResult(BaseModel):
    model_name: str
    model_version: str
    previous_version: str


class FeedbackIn(BaseModel):
    request_id: str = Field(min_length=1, max_length=128)
    label: int | str


class FeedbackOut(BaseModel):
    request_id: str
    label: int
    label_name: str


def create_app(
    service: EdgeService,
    *,
    max_body_bytes: int = 8 * 1024 * 1024,
    rollback: Callable[[], RollbackResult] | None = None,
) -> Starlette:
    """The ASGI app serving ``service``; ``rollback`` switches back to the previous bundle."""

    def healthz(request: Request) -> JSONResponse:
        runtime = service.runtime
        body: dict[str, Any] = {
            "status": "ok",
            "device_id": service.device_id,
            "model_name": runtime.name,
            "model_version": runtime.version,
            "policy": service.policy.name,
            "broker_connected": bool(service.escalator and service.escalator.connected),
        }
        if service.breaker is not None:
            body["breaker"] = service.breaker.state
        if service.update_error:
            body["update_error"] = service.update_error
        return JSONResponse(body)

    def metrics(request: Request) -> Response:
        return Response(render_metrics(service), media_type=METRICS_TYPE)

    def stats(request: Request) -> JSONResponse:
        escalation = asdict(service.escalator.stats()) if service.escalator else {}
        box = service.outbox
        outbox = {}
        if box is not None:
            outbox = {"queued": len(box), "delivered": box.delivered, "dropped": box.dropped}
        breaker = {}
        if service.breaker is not None:
            b = service.breaker
            breaker = {"state": b.state, "opened": b.opened, "short_circuited": b.short_circuited}
        return JSONResponse(
            {"requests": asdict(service.stats()), "escalation": escalation, "outbox": outbox, "breaker": breaker}
        )

    async def infer(request: Request) -> JSONResponse:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type not in (*IMAGE_TYPES, TENSOR_CONTENT_TYPE, MULTIPART):
            raise HTTPException(
                415,
                f"content type {content_type or '(none)'!r} is not supported; send "
                f"{', '.join(IMAGE_TYPES)}, {TENSOR_CONTENT_TYPE} or {MULTIPART} with a 'file' field",
            )
        metadata_text = request.headers.get(METADATA_HEADER)
        body = await _read_body(request, max_body_bytes)
        if content_type == MULTIPART:
            body, form_meta = await _from_form(request.scope, body)
            metadata_text = form_meta if form_meta is not None else metadata_text
        if not body:
            raise HTTPException(400, "request body is empty; send one image or one tensor frame")
        try:
            metadata = _parse_metadata(metadata_text)
            if content_type == TENSOR_CONTENT_TYPE:
                result = await service.infer(_tensor_from_frame(body), metadata)
            else:
                result = await service.infer_image(body, metadata)
        except (InputError, RedactionError) as exc:
            raise HTTPException(400, str(exc)) from None
        except ModelError as exc:
            raise HTTPException(500, str(exc)) from None
        return _json(result)

    async def feedback(request: Request) -> JSONResponse:
        body = _validated(FeedbackIn, await _read_body(request, _MAX_JSON_BYTES))
        try:
            label = service.feedback(body.request_id, body.label)
        except FeedbackError as exc:
            status = 404 if "unknown" in str(exc) else 409 if "disabled" in str(exc) else 400
            raise HTTPException(status, str(exc)) from None
        return _json(FeedbackOut(request_id=body.request_id, label=label, label_name=service.runtime.labels[label]))

    def model_rollback(request: Request) -> JSONResponse:
        if rollback is None:
            raise HTTPException(409, "rollback is not available on this agent")
        try:
            return _json(rollback())
        except RollbackError as exc:
            raise HTTPException(409, str(exc)) from None

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code in (204, 304):  # no body allowed
            return Response(status_code=exc.status_code, headers=exc.headers)
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    routes = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v1/stats", stats, methods=["GET"]),
        Route("/v1/infer", infer, methods=["POST"]),
        Route("/v1/feedback", feedback, methods=["POST"]),
        Route("/v1/model/rollback", model_rollback, methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})


# Feedback bodies are a request id and a label: a few hundred bytes.
_MAX_JSON_BYTES = 64 * 1024


def _json(model: BaseModel) -> JSONResponse:
    return JSONResponse(model.model_dump(mode="json"))


_M = TypeVar("_M", bound=BaseModel)


def _validated(model: type[_M], body: bytes) -> _M:
    """``body`` (JSON) as ``model``, or a 422 naming the first problem (FastAPI's status for the same)."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "body"
        raise HTTPException(422, f"request body is invalid: {where}: {err['msg']}") from None


def _parse_metadata(text: str | None) -> object | None:
    if text is None or not text.strip():
        return None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise RedactionError(f"metadata is not valid JSON ({exc}); send a JSON object of strings") from None


async def _from_form(scope: dict[str, Any], body: bytes) -> tuple[bytes, str | None]:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:  # the body was already read within the size limit; parse it from memory
        form = await Request(scope, receive).form()
    except Exception as exc:  # python-multipart raises several unrelated types for a broken body
        raise HTTPException(400, f"multipart body is malformed: {exc}") from None
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise HTTPException(400, "multipart body has no 'file' field holding the image")
    meta = form.get("metadata")
    return await upload.read(), meta if isinstance(meta, str) else None


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"request body is {int(declared)} bytes; the limit is {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:  # a missing or lying Content-Length must not make us buffer more
            raise HTTPException(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _tensor_from_frame(body: bytes) -> np.ndarray:
    try:
        frame = decode_frame(body)
    except CodecError as exc:
        raise InputError(f"tensor frame is malformed: {exc}") from None
    if frame.tensor is None:
        raise InputError("tensor frame carries no tensor")
    return frame.tensor
