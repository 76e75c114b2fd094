"""The bundle manifest: what a model is, how to feed it, how it was made, and its signature."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["InputSpec", "BundleMetrics", "Provenance", "Manifest", "canonical_bytes"]

MANIFEST_SCHEMA = "edgefed.bundle/v1"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputSpec(_Strict):
    """How raw input becomes the model's input tensor.

    Images are converted to ``channels`` (1 = grayscale), resized to (height, width), scaled to
    [0, 1], then normalised channel-wise with ``mean`` and ``std``.
    """

    name: str = "input"
    shape: list[int] = Field(description="Input shape with batch dimension first, e.g. [1, 1, 64, 64]")
    dtype: Literal["float32"] = "float32"
    layout: Literal["NCHW"] = "NCHW"
    mean: list[float] = Field(default_factory=lambda: [0.0])
    std: list[float] = Field(default_factory=lambda: [1.0])

    @property
    def channels(self) -> int:
        return self.shape[1]

    @property
    def height(self) -> int:
        return self.shape[2]

    @property
    def width(self) -> int:
        return self.shape[3]


class BundleMetrics(_Strict):
    """Measured on the task's holdout split when the bundle was made."""

    fp32_accuracy: float | None = None
    int8_accuracy: float | None = None
    accuracy_drop_pt: float | None = None
    fp32_size_bytes: int | None = None
    int8_size_bytes: int | None = None
    fp32_latency_ms: float | None = None
    int8_latency_ms: float | None = None
    holdout_size: int | None = None
    # Confidence (max softmax) of the INT8 model on the calibration split, for escalation policies.
    calibration_confidence_quantiles: list[float] | None = None
    # Same split, same 101 quantiles (0 %, 1 %, ..., 100 %), of top-1 minus top-2 probability.
    calibration_margin_quantiles: list[float] | None = None
    # Same split, same quantiles, of 1 - entropy / log(K) (Sedna's cross-entropy score; 1 = certain).
    calibration_entropy_quantiles: list[float] | None = None


class Provenance(_Strict):
    """How the bundle was made."""

    source_checkpoint_sha256: str | None = None
    architecture: str | None = None
    compression: dict[str, Any] = Field(default_factory=dict)
    federation_round: str | None = None
    created_by: str = "edgefed model compress"


class Manifest(_Strict):
    schema_: str = Field(default=MANIFEST_SCHEMA, alias="schema")
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    version: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
    parent_version: str | None = None
    task: str = Field(min_length=1, max_length=128)
    created_at: str
    input: InputSpec
    labels: list[str] = Field(min_length=2)
    model_file: str = "model.onnx"
    model_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    model_size_bytes: int
    metrics: BundleMetrics = Field(default_factory=BundleMetrics)
    provenance: Provenance = Field(default_factory=Provenance)
    # Ed25519 over canonical_bytes(manifest); hex of the 32-byte raw public key's SHA-256 prefix.
    key_id: str | None = None
    signature: str | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json", by_alias=True), indent=2, sort_keys=True)


def canonical_bytes(manifest: Manifest) -> bytes:
    """The exact bytes that are signed: the manifest without its signature, keys sorted, compact."""
    body = manifest.model_dump(mode="json", by_alias=True, exclude={"signature"})
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
