"""The models and data a benchmark measures: the factory's reference pair, and the test split as the
edge sees it (same seed and slice as the bundle's own holdout, taken from its provenance).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shared.bundle import Manifest, VerifiedBundle

__all__ = ["BenchModels", "EvalData", "load_models", "load_eval_data", "reversion_bundle"]


@dataclass(frozen=True)
class BenchModels:
    cloud_checkpoint: Path
    edge_checkpoint: Path
    bundle: VerifiedBundle
    signing_key: Path
    public_key: Path


@dataclass(frozen=True)
class EvalData:
    """Preprocessed inputs (N×C×H×W float32, as the edge feeds them) and labels of two splits."""

    task: str
    test_x: np.ndarray
    test_y: np.ndarray
    calibration_x: np.ndarray
    calibration_y: np.ndarray
    seed: int
    limit: int | None


def load_models(
    models_dir: Path,
    task: str,
    *,
    signing_key: Path | None = None,
    epochs: int | None = None,
    resolution: int | None = None,
    limit: int | None = None,
    progress: bool = False,
    reuse: bool = False,
) -> BenchModels:
    """The reference models in ``models_dir`` (trained and compressed there first if absent).

    With ``reuse``, checkpoints and a bundle already in ``models_dir`` are measured as they are when
    the bundle verifies, even if the factory's recipe changed since they were made (a benchmark
    measures given models; retraining is the factory's business).

    ``signing_key`` defaults to ``models_dir/signing.key``: pass the key the bundle was signed with
    when reusing another directory (e.g. the demo's ``demo-output/keys/factory.pem``), or the cached
    bundle does not verify and is compressed again.
    """
    from cloud_hub.factory import build_reference_models

    models_dir = Path(models_dir)
    key = Path(signing_key) if signing_key is not None else models_dir / "signing.key"
    if reuse:
        found = _existing(models_dir, key)
        if found is not None:
            return found
    refs = build_reference_models(
        models_dir, task, epochs=epochs, resolution=resolution, limit=limit, signing_key=key, progress=progress,
        max_drop_pt=1.0 if limit is None else 100.0,
    )
    return BenchModels(refs.cloud_checkpoint, refs.edge_checkpoint, refs.bundle, key, refs.public_key)


def _existing(models_dir: Path, key: Path) -> BenchModels | None:
    from cloud_hub.factory import public_key_path
    from shared.bundle import BundleError, load_public_key, open_bundle

    cloud, edge, bundle_dir = models_dir / "cloud.pt", models_dir / "edge.pt", models_dir / "bundle"
    pub = public_key_path(key)
    if not (cloud.is_file() and edge.is_file() and bundle_dir.is_dir() and pub.is_file()):
        return None
    try:
        bundle = open_bundle(bundle_dir, [load_public_key(pub)])
    except BundleError:
        return None
    return BenchModels(cloud, edge, bundle, key, pub)


def load_eval_data(manifest: Manifest, *, cache_dir: Path | None = None) -> EvalData:
    """The test and calibration splits the bundle was measured on, preprocessed per its input spec."""
    from shared.data import load_task, task_split, to_model_input

    compression: dict[str, Any] = manifest.provenance.compression if manifest.provenance else {}
    seed = int(compression.get("split_seed", 0))
    limit = compression.get("limit")
    spec = manifest.input
    ds = load_task(manifest.task, (spec.height, spec.width), cache_dir=cache_dir, limit=limit)
    split = task_split(ds, seed=seed)
    return EvalData(
        task=manifest.task,
        test_x=to_model_input(ds.images[split.test], spec),
        test_y=ds.labels[split.test],
        calibration_x=to_model_input(ds.images[split.calibration], spec),
        calibration_y=ds.labels[split.calibration],
        seed=seed,
        limit=limit,
    )


def reversion_bundle(bundle: VerifiedBundle, version: str, out_dir: Path, signing_key: Path) -> VerifiedBundle:
    """The same model as a new version (parent: the bundle's version), signed with ``signing_key``."""
    from shared.bundle import load_private_key, write_bundle

    manifest = bundle.manifest.model_copy(
        update={"version": version, "parent_version": bundle.manifest.version}
    )
    return write_bundle(Path(out_dir), bundle.model_path, manifest, load_private_key(signing_key))
