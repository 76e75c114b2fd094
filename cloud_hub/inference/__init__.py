"""Cloud-model inference: the active checkpoint per task, behind a dynamic batcher.

Imports torch, numpy and prometheus-client only (checkpoints, which need pydantic, load inside
``load_model``), so the P4 benchmark runs on a bare GPU box.
"""

from cloud_hub.inference.batcher import BatchFailed, DeadlineExceeded, DynamicBatcher, QueueFull
from cloud_hub.inference.model import BadTensor, LoadedModel, ModelSpec, UnknownTask, load_model, size_classes
from cloud_hub.inference.service import InferenceService, Prediction

__all__ = [
    "BadTensor",
    "BatchFailed",
    "DeadlineExceeded",
    "DynamicBatcher",
    "InferenceService",
    "LoadedModel",
    "ModelSpec",
    "Prediction",
    "QueueFull",
    "UnknownTask",
    "load_model",
    "size_classes",
]
