"""The agent's local HTTP API (loopback by default): the camera line's client talks to this.

- ``POST /v1/infer``: body is one image (``image/png``, ``image/jpeg``) or one tensor frame
  (``application/x-edgefed-tensor``, a ``shared.codec`` frame whose tensor matches the input spec, N=1).
- ``GET /healthz``: 200 with the model version while a model is loaded.
- ``GET /v1/stats``: request and escalation counters.

Bad input gets a 4xx whose ``detail`` names the problem; nothing else changes. Status codes are
chosen here and only here.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request

from edge_agent.runtime import InputError, ModelError
from edge_agent.service import EdgeService, InferenceResult
from shared.codec import CodecError, decode_frame

__all__ = ["IMAGE_TYPES", "TENSOR_CONTENT_TYPE", "create_app"]

TENSOR_CONTENT_TYPE = "application/x-edgefed-tensor"
IMAGE_TYPES = ("image/png", "image/jpeg")


def create_app(service: EdgeService, *, max_body_bytes: int = 8 * 1024 * 1024) -> FastAPI:
    """The ASGI app serving ``service``."""
    app = FastAPI(title="edgefed agent", summary=f"edge agent {service.device_id}")

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        runtime = service.runtime
        return {
            "status": "ok",
            "device_id": service.device_id,
            "model_name": runtime.name,
            "model_version": runtime.version,
            "policy": service.policy.name,
            "broker_connected": bool(service.escalator and service.escalator.connected),
        }

    @app.get("/v1/stats")
    def stats() -> dict[str, Any]:
        escalation = asdict(service.escalator.stats()) if service.escalator else {}
        box = service.outbox
        outbox = {}
        if box is not None:
            outbox = {"queued": len(box), "delivered": box.delivered, "dropped": box.dropped}
        return {"requests": asdict(service.stats()), "escalation": escalation, "outbox": outbox}

    @app.post("/v1/infer", response_model=InferenceResult)
    async def infer(request: Request) -> InferenceResult:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type not in (*IMAGE_TYPES, TENSOR_CONTENT_TYPE):
            raise HTTPException(
                415,
                f"content type {content_type or '(none)'!r} is not supported; send "
                f"{', '.join(IMAGE_TYPES)} or {TENSOR_CONTENT_TYPE}",
            )
        body = await _read_body(request, max_body_bytes)
        if not body:
            raise HTTPException(400, "request body is empty; send one image or one tensor frame")
        try:
            if content_type == TENSOR_CONTENT_TYPE:
                return await service.infer(_tensor_from_frame(body))
            return await service.infer_image(body)
        except InputError as exc:
            raise HTTPException(400, str(exc)) from None
        except ModelError as exc:
            raise HTTPException(500, str(exc)) from None

    return app


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
