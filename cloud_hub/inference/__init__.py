"""Cloud-model inference: the active checkpoint per task, and a worker thread that batches requests."""

from cloud_hub.inference.model import BadTensor, LoadedModel, ModelSpec, UnknownTask, load_model
from cloud_hub.inference.service import InferenceService, Prediction

__all__ = [
    "BadTensor",
    "InferenceService",
    "LoadedModel",
    "ModelSpec",
    "Prediction",
    "UnknownTask",
    "load_model",
]
