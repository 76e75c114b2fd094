"""Helpers for federation tests: a tiny edge checkpoint, regional learning stores and a reference set.

The data are a learnable toy task on the hub fixtures' shapes (task "t", labels a/b, 1×32×32):
class 1 images are brighter in their left half. Stores hold cases as the edge agent writes them
(``edge_agent.learning_store.LearningStore``: shared codec frames), with a mix of inspector-confirmed
labels, cloud answers with probabilities, cloud probabilities only, and unanswered cases.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.hub_fixtures import INPUT_SHAPE, LABELS, TASK

__all__ = ["toy_images", "make_edge_checkpoint", "make_learning_store", "make_reference", "make_regions"]


def toy_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.normal(0, 1, (n, *INPUT_SHAPE[1:])).astype(np.float32)
    x[y == 1, :, :, : INPUT_SHAPE[3] // 2] += 1.5
    return x, y.astype(np.int64)


def make_edge_checkpoint(path: Path, seed: int = 0) -> Path:
    """A random-weight EdgeCNN (width 8) checkpoint for the toy task."""
    import torch

    from shared.bundle import InputSpec
    from shared.models import CheckpointMeta, build_model, save_checkpoint

    torch.manual_seed(seed)
    kwargs = {"in_channels": 1, "num_classes": len(LABELS), "width": 8}
    model = build_model("edge-cnn", **kwargs).eval()
    meta = CheckpointMeta(name="t-edge", version="1", role="edge", task=TASK, arch="edge-cnn", arch_kwargs=kwargs,
                          labels=list(LABELS), input=InputSpec(shape=list(INPUT_SHAPE)))
    save_checkpoint(path, meta, model)
    return path


def make_learning_store(data_dir: Path, n: int, seed: int) -> Path:
    """A learning store with ``n`` cases: 1/4 confirmed + cloud answer, 1/4 cloud only, 1/4 confirmed only,
    1/4 unanswered (+ one case of another task that must be ignored)."""
    from edge_agent.learning_store import LearningStore

    x, y = toy_images(n, seed)
    store = LearningStore(data_dir / "agent-1" / "learning.sqlite3").open()
    try:
        for i in range(n):
            rid = f"s{seed}-{i}"
            store.record_case(rid, x[i : i + 1], task=TASK, model_name="t-edge", model_version="1",
                              edge_label=0, edge_confidence=0.5)
            probs = np.array([0.1, 0.9] if y[i] else [0.9, 0.1], dtype=np.float32)
            kind = i % 4
            if kind == 0:
                store.record_cloud(rid, int(y[i]), probs, "t-cloud:1")
                store.confirm(rid, int(y[i]))
            elif kind == 1:
                store.record_cloud(rid, int(y[i]), probs, "t-cloud:1")
            elif kind == 2:
                store.confirm(rid, int(y[i]))
        store.record_case("other-task", x[:1], task="elpv", model_name="e", model_version="1", edge_label=0,
                          edge_confidence=0.5)
        store.record_cloud("other-task", 1, None, "c:1")
    finally:
        store.close()
    return data_dir


def make_reference(path: Path, n: int = 64, seed: int = 99) -> Path:
    x, y = toy_images(n, seed)
    np.savez(path, x=x, y=y)
    return path


def make_regions(root: Path, names: list[str], n: int = 32) -> dict[str, Path]:
    out = {}
    for i, name in enumerate(names):
        out[name] = make_learning_store(root / f"data-{name}", n, seed=i + 1)
    return out
