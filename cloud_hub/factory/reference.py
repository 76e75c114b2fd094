"""Reference models for fixtures and the demo: train once, compress, reuse while nothing changed."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cloud_hub.factory.compress import compress_checkpoint, ensure_signing_key, public_key_path
from cloud_hub.factory.train import TrainConfig, train_models
from shared.bundle import BundleError, VerifiedBundle, load_public_key, open_bundle

__all__ = ["ReferenceModels", "build_reference_models"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReferenceModels:
    cloud_checkpoint: Path
    edge_checkpoint: Path
    bundle: VerifiedBundle
    public_key: Path

    def __iter__(self) -> Iterator[Any]:
        """Allows ``cloud, edge, bundle = build_reference_models(...)``."""
        return iter((self.cloud_checkpoint, self.edge_checkpoint, self.bundle))


def _train_key(
    task: str, epochs: int | None, resolution: int | tuple[int, int] | None, limit: int | None, seed: int
) -> dict[str, object]:
    res = [resolution, resolution] if isinstance(resolution, int) else (list(resolution) if resolution else None)
    # The training recipe is part of the key, so checkpoints cached under older defaults are retrained.
    recipe = asdict(TrainConfig())
    return {"task": task, "epochs": epochs, "resolution": res, "limit": limit, "seed": seed, "recipe": recipe}


def build_reference_models(
    work_dir: Path,
    task: str = "elpv",
    *,
    epochs: int | None = None,
    resolution: int | tuple[int, int] | None = None,
    limit: int | None = None,
    signing_key: Path | None = None,
    seed: int = 0,
    max_drop_pt: float = 1.0,
    force: bool = False,
    progress: bool = False,
    cache_dir: Path | None = None,
) -> ReferenceModels:
    """Train (unless ``work_dir`` holds checkpoints made with the same settings) and compress.

    Writes ``cloud.pt``, ``edge.pt``, ``train_metrics.json`` and the bundle directory ``bundle/``
    into ``work_dir``; the signing key defaults to ``work_dir/signing.key`` (created if absent, its
    public half at ``signing.pub``). On small ``limit`` slices the holdout is tiny (one item
    can be several points), so loosen ``max_drop_pt`` there.
    """
    work_dir = Path(work_dir)
    key_path = Path(signing_key) if signing_key is not None else work_dir / "signing.key"
    ensure_signing_key(key_path)
    pub_path = public_key_path(key_path)
    cloud, edge, metrics_file = work_dir / "cloud.pt", work_dir / "edge.pt", work_dir / "reference.json"
    key = _train_key(task, epochs, resolution, limit, seed)
    cached = (
        not force
        and cloud.is_file()
        and edge.is_file()
        and metrics_file.is_file()
        and json.loads(metrics_file.read_text()) == key
    )
    if not cached:
        train_models(task, work_dir, epochs, resolution, limit, seed, progress, cache_dir=cache_dir)
        metrics_file.write_text(json.dumps(key) + "\n")
    else:
        log.info("reusing reference checkpoints in %s", work_dir)
    bundle_dir = work_dir / "bundle"
    if cached and bundle_dir.is_dir():
        try:
            return ReferenceModels(cloud, edge, open_bundle(bundle_dir, [load_public_key(pub_path)]), pub_path)
        except BundleError as exc:
            log.warning("cached bundle %s is unusable (%s); compressing again", bundle_dir, exc)
    if bundle_dir.exists():
        shutil.rmtree(bundle_dir)
    bundle = compress_checkpoint(
        edge, bundle_dir, key_path, max_drop_pt=max_drop_pt, cache_dir=cache_dir, limit=limit, seed=seed
    )
    return ReferenceModels(cloud, edge, bundle, pub_path)
