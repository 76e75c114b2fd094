"""Checkpoint -> gated, signed INT8 bundle.

``compress_checkpoint`` exports the network to ONNX FP32, quantizes it statically to INT8 (QOperator
format by default, QDQ on request) with a calibration split, measures both on the holdout split with
onnxruntime, refuses the result when the accuracy drop exceeds the gate (``AccuracyGateError``;
nothing is written), and otherwise writes a signed bundle. Exceptions::

    CompressionError
    ├── AccuracyGateError   the INT8 model lost more accuracy than allowed; no bundle written
    └── BundleExistsError   the output directory already holds files; nothing touched
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud_hub.factory.evaluate import evaluate_model, make_session, onnx_logits, score_quantiles
from cloud_hub.factory.quantize import QuantSettings, export_onnx, preprocess_onnx, quantize_int8
from shared.bundle import BundleMetrics, InputSpec, Manifest, Provenance, VerifiedBundle, write_bundle
from shared.bundle.signing import generate_keypair, load_private_key
from shared.data import load_task, task_split, to_model_input

__all__ = [
    "CompressionError",
    "AccuracyGateError",
    "BundleExistsError",
    "public_key_path",
    "ensure_signing_key",
    "compress_checkpoint",
]

log = logging.getLogger(__name__)


class CompressionError(Exception):
    """A checkpoint could not be turned into a bundle."""


class AccuracyGateError(CompressionError):
    """The INT8 model lost more accuracy than the gate allows; no bundle was written."""

    def __init__(self, fp32_accuracy: float, int8_accuracy: float, max_drop_pt: float, holdout_size: int) -> None:
        self.fp32_accuracy = fp32_accuracy
        self.int8_accuracy = int8_accuracy
        self.drop_pt = 100.0 * (fp32_accuracy - int8_accuracy)
        self.max_drop_pt = max_drop_pt
        super().__init__(
            f"INT8 accuracy {100 * int8_accuracy:.2f}% vs FP32 {100 * fp32_accuracy:.2f}% on {holdout_size} "
            f"holdout items is a drop of {self.drop_pt:.2f} pt, above the gate of {max_drop_pt:g} pt; "
            "no bundle was written"
        )


class BundleExistsError(CompressionError):
    """The output directory is not empty; compressing would overwrite another bundle."""


def public_key_path(signing_key: Path) -> Path:
    """Where the public half of ``signing_key`` lives: its suffix replaced by (or extended with) ``.pub``."""
    signing_key = Path(signing_key)
    if signing_key.suffix == ".pub":
        raise ValueError(f"signing key path {signing_key} ends in .pub, which is reserved for the public key")
    return signing_key.with_suffix(".pub")


def ensure_signing_key(path: Path) -> Ed25519PrivateKey:
    """Load the Ed25519 signing key at ``path``; create a new pair if absent (see ``public_key_path``)."""
    path = Path(path)
    if not path.exists():
        key = generate_keypair(path, public_key_path(path))
        log.warning("created a new signing key pair: %s and %s", path, public_key_path(path))
        return key
    return load_private_key(path)


def _holdout_inputs(
    task: str, spec: InputSpec, cache_dir: Path | None, limit: int | None, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Calibration inputs, test inputs and test labels, preprocessed exactly as the edge does."""
    ds = load_task(task, (spec.height, spec.width), cache_dir=cache_dir, limit=limit)
    split = task_split(ds, seed=seed)
    if len(split.calibration) == 0 or len(split.test) == 0:
        raise CompressionError(f"{len(ds)} items give no calibration or test split; raise the limit")
    cal = to_model_input(ds.images[split.calibration], spec)
    test = to_model_input(ds.images[split.test], spec)
    return cal, test, ds.labels[split.test]


def compress_checkpoint(
    checkpoint_path: Path,
    out_dir: Path,
    signing_key_path: Path,
    *,
    name: str | None = None,
    version: str | None = None,
    parent_version: str | None = None,
    max_drop_pt: float = 1.0,
    calibration_size: int = 256,
    per_channel: bool = True,
    reduce_range: bool = True,
    calibrate_method: Literal["MinMax", "Entropy", "Percentile"] = "MinMax",
    quant_format: Literal["QOperator", "QDQ"] = "QOperator",
    cache_dir: Path | None = None,
    limit: int | None = None,
    seed: int = 0,
    latency_runs: int = 200,
    federation_round: str | None = None,
) -> VerifiedBundle:
    """Export, quantize, measure, gate and sign; return the written bundle.

    The holdout is the test split of the checkpoint's task (``shared.data.task_split`` with
    ``seed``, optionally on a ``limit`` slice: use the same values as for training). Defaults
    (per-channel, ``reduce_range``) were chosen by measurement: without ``reduce_range`` the U8S8
    kernels of AVX2 CPUs without VNNI saturate and ELPV accuracy fell by 27 pt. ``quant_format``
    ``QOperator`` (default) writes the integer operators themselves, a smaller file than ``QDQ``
    with the same kernels at run time (see ``cloud_hub.factory.quantize``). ``federation_round``
    names the federation run that produced the checkpoint, for the manifest's provenance.
    """
    from shared.models import load_checkpoint

    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise BundleExistsError(f"output {out_dir} already exists and is not an empty directory; nothing written")
    key = ensure_signing_key(Path(signing_key_path))
    ckpt = load_checkpoint(Path(checkpoint_path))
    meta = ckpt.meta
    spec = meta.input.model_copy(update={"name": "input"})
    settings = QuantSettings(
        per_channel=per_channel,
        reduce_range=reduce_range,
        calibrate_method=calibrate_method,
        calibration_size=calibration_size,
        quant_format=quant_format,
    )
    cal_x, test_x, test_y = _holdout_inputs(meta.task, spec, cache_dir, limit, seed)

    with tempfile.TemporaryDirectory(prefix="edgefed-compress-") as tmp_name:
        tmp = Path(tmp_name)
        fp32 = export_onnx(ckpt.model, tmp / "fp32.onnx", spec.shape, spec.name)
        prepared = preprocess_onnx(fp32, tmp / "fp32-prepared.onnx")
        int8 = quantize_int8(prepared, tmp / "model.onnx", cal_x, settings, spec.name)
        fp32_report = evaluate_model(fp32, test_x, test_y, latency_runs=latency_runs)
        int8_report = evaluate_model(int8, test_x, test_y, latency_runs=latency_runs)
        drop_pt = 100.0 * (fp32_report.accuracy - int8_report.accuracy)
        log.info(
            "FP32 %.4f / INT8 %.4f accuracy (drop %.2f pt), %d / %d bytes, %.3f / %.3f ms",
            fp32_report.accuracy,
            int8_report.accuracy,
            drop_pt,
            fp32_report.size_bytes,
            int8_report.size_bytes,
            fp32_report.latency_ms,
            int8_report.latency_ms,
        )
        if drop_pt > max_drop_pt:
            raise AccuracyGateError(fp32_report.accuracy, int8_report.accuracy, max_drop_pt, len(test_y))
        cal_logits = onnx_logits(make_session(int8), cal_x)
        metrics = BundleMetrics(
            fp32_accuracy=round(fp32_report.accuracy, 6),
            int8_accuracy=round(int8_report.accuracy, 6),
            accuracy_drop_pt=round(drop_pt, 4),
            fp32_size_bytes=fp32_report.size_bytes,
            int8_size_bytes=int8_report.size_bytes,
            fp32_latency_ms=round(fp32_report.latency_ms, 4),
            int8_latency_ms=round(int8_report.latency_ms, 4),
            holdout_size=len(test_y),
            calibration_confidence_quantiles=score_quantiles(cal_logits, "confidence"),
            calibration_margin_quantiles=score_quantiles(cal_logits, "margin"),
            calibration_entropy_quantiles=score_quantiles(cal_logits, "entropy"),
        )
        manifest = Manifest(
            name=name or f"{meta.task}-edge",
            version=version or meta.version,
            parent_version=parent_version if parent_version is not None else meta.parent_version,
            task=meta.task,
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            input=spec,
            labels=list(meta.labels),
            model_sha256="0" * 64,  # filled in by write_bundle
            model_size_bytes=0,
            metrics=metrics,
            provenance=Provenance(
                source_checkpoint_sha256=ckpt.sha256,
                architecture=meta.arch,
                federation_round=federation_round,
                compression={
                    **settings.as_dict(),
                    "calibration_items": int(min(len(cal_x), calibration_size)),
                    "holdout": "test split",
                    "split_seed": seed,
                    "limit": limit,
                    "arch_kwargs": meta.arch_kwargs,
                    "latency": "median of batch-1 runs, onnxruntime CPU, 1 intra-op thread",
                    "onnxruntime": _version("onnxruntime"),
                    "torch": _version("torch"),
                },
            ),
        )
        # Write beside the target, then rename: a reader never sees a half-written bundle.
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
        staging.chmod(0o755)  # mkdtemp makes it owner-only; a bundle is not a secret
        try:
            written = write_bundle(staging, int8, manifest, key)
            if out_dir.exists():
                out_dir.rmdir()  # empty, checked above
            os.replace(staging, out_dir)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return VerifiedBundle(path=out_dir, manifest=written.manifest)


def _version(module: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return "unknown"
