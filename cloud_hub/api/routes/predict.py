"""The full cloud model over REST: one ``shared.codec`` frame in, JSON out."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from pydantic import BaseModel

from cloud_hub.api.deps import PrincipalDep, ServicesDep, read_body
from cloud_hub.errors import InvalidInput, Unavailable
from shared.codec import CodecError, decode_frame

router = APIRouter(prefix="/api/v1", tags=["predict"])

PREDICT_TIMEOUT_S = 60.0
_MAX_FRAME = 16 * 1024 * 1024


class PredictionPublic(BaseModel):
    """One entry per sample in each list; ``labels`` are class indices, ``label_names`` their names."""

    task: str
    model_name: str
    model_version: str
    labels: list[int]
    label_names: list[str]
    confidences: list[float]
    probabilities: list[list[float]]
    inference_ms: float


@router.post("/predict", response_model=PredictionPublic)
async def predict(request: Request, services: ServicesDep, _: PrincipalDep) -> PredictionPublic:
    """Body: a codec frame holding a float32 N×C×H×W tensor and metadata ``{"task": ...}``."""
    payload = await read_body(request, _MAX_FRAME)
    try:
        frame = decode_frame(payload)
    except CodecError as exc:
        raise InvalidInput(f"body is not a valid tensor frame: {exc}") from None
    task = frame.meta.get("task")
    if not isinstance(task, str) or not task:
        raise InvalidInput('frame metadata needs a "task" string naming the cloud model\'s task')
    if frame.tensor is None:
        raise InvalidInput("frame carries no tensor; send a float32 N×C×H×W tensor")
    future = services.inference.submit_async(task, frame.tensor)  # answered once per batch, on this loop
    try:
        pred = await asyncio.wait_for(future, PREDICT_TIMEOUT_S)
    except TimeoutError:
        raise Unavailable(f"inference did not finish within {PREDICT_TIMEOUT_S:.0f} s; retry later") from None
    return PredictionPublic(
        task=pred.task,
        model_name=pred.model_name,
        model_version=pred.model_version,
        labels=pred.label_ids,
        label_names=pred.labels,
        confidences=pred.confidences,
        probabilities=pred.probabilities.tolist(),
        inference_ms=pred.inference_ms,
    )
