"""The reference tasks: what each predicts, how its input is shaped, and how to load it.

numpy only (no torch): the edge agent and the benchmarks use these definitions too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.bundle.manifest import InputSpec
from shared.data.elpv import load_elpv
from shared.data.fashion_mnist import DEFAULT_ROOT, FMNIST_LABELS, load_fashion_mnist
from shared.data.preprocess import resize_images
from shared.data.splits import stratified_subset

__all__ = ["TaskSpec", "Dataset", "UnknownTaskError", "TASKS", "get_task", "load_task"]


class UnknownTaskError(KeyError):
    """A task name that is not one of ``TASKS``."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0])


@dataclass(frozen=True)
class TaskSpec:
    """A task: its labels and default input. ``mean``/``std`` are fixed constants measured once on
    the full dataset at the default resolution (ELPV: 0.5971/0.1546; Fashion-MNIST: the customary
    0.2860/0.3530), so every model of a task is fed the same way."""

    name: str
    source: str
    labels: tuple[str, ...]
    resolution: tuple[int, int]
    channels: int = 1
    mean: float = 0.0
    std: float = 1.0
    description: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def input_spec(self, resolution: tuple[int, int] | None = None) -> InputSpec:
        h, w = resolution or self.resolution
        return InputSpec(shape=[1, self.channels, h, w], mean=[self.mean], std=[self.std])


TASKS: dict[str, TaskSpec] = {
    "elpv": TaskSpec(
        name="elpv",
        source="elpv",
        labels=("functional", "defective"),
        resolution=(64, 64),
        mean=0.5971,
        std=0.1546,
        description="solar cell defective iff defect probability >= 0.5 (ELPV)",
    ),
    "elpv4": TaskSpec(
        name="elpv4",
        source="elpv",
        labels=("p0", "p1/3", "p2/3", "p1"),
        resolution=(64, 64),
        mean=0.5971,
        std=0.1546,
        description="solar cell defect probability, four levels (ELPV)",
    ),
    "fmnist": TaskSpec(
        name="fmnist",
        source="fmnist",
        labels=tuple(FMNIST_LABELS),
        resolution=(28, 28),
        mean=0.2860,
        std=0.3530,
        description="Fashion-MNIST, 10 clothing classes",
    ),
}


@dataclass(frozen=True)
class Dataset:
    """One task's items at one resolution.

    ``groups`` is the unit that must stay together (ELPV: pseudo-module id; Fashion-MNIST: the item
    itself). ``types`` is a categorical attribute used for stratification and regions (ELPV: module
    type "mono"/"poly"; Fashion-MNIST: the official split "train"/"test"). ``soft_labels``, where the
    source has them, is a float32 N×K distribution over the labels (ELPV binary: [1 - p, p] from the
    annotators' defect probability p), which keeps the annotators' doubt that ``labels`` rounds away.
    """

    task: TaskSpec
    images: np.ndarray  # uint8 N×H×W
    labels: np.ndarray  # int64 N
    groups: np.ndarray  # int64 N
    types: np.ndarray  # str N
    soft_labels: np.ndarray | None = None  # float32 N×K, rows sum to 1; None where the source has none

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def resolution(self) -> tuple[int, int]:
        return int(self.images.shape[1]), int(self.images.shape[2])

    @property
    def input_spec(self) -> InputSpec:
        return self.task.input_spec(self.resolution)

    def subset(self, indices: np.ndarray) -> Dataset:
        idx = np.asarray(indices, dtype=np.int64)
        soft = None if self.soft_labels is None else self.soft_labels[idx]
        return Dataset(self.task, self.images[idx], self.labels[idx], self.groups[idx], self.types[idx], soft)


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise UnknownTaskError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None


def _elpv_labels(task: str, probs: np.ndarray) -> np.ndarray:
    if task == "elpv":
        return (probs >= 0.5).astype(np.int64)
    # Probabilities are k/3; rounding 3p recovers k without float equality tests.
    return np.clip(np.rint(probs * 3), 0, 3).astype(np.int64)


def _elpv_soft_labels(task: str, probs: np.ndarray) -> np.ndarray | None:
    """Binary ELPV: [1 - p, p]. The four-level task's labels already are the probability levels."""
    if task != "elpv":
        return None
    p = np.clip(np.asarray(probs, dtype=np.float32), 0.0, 1.0)
    return np.stack([1.0 - p, p], axis=1)


def load_task(
    name: str,
    resolution: tuple[int, int] | int | None = None,
    cache_dir: Path | None = None,
    limit: int | None = None,
    *,
    fmnist_root: Path = DEFAULT_ROOT,
) -> Dataset:
    """Load a task's full dataset (or a deterministic stratified slice of ``limit`` items).

    ``resolution`` is (height, width) or one int for square; default is the task's. ELPV resized
    images are cached under ``cache_dir`` (default ``~/.cache/edgefed``).
    """
    spec = get_task(name)
    if isinstance(resolution, int):
        resolution = (resolution, resolution)
    res = tuple(resolution) if resolution else spec.resolution
    if len(res) != 2 or min(res) < 8 or max(res) > 1024:
        raise ValueError(f"resolution must be (height, width) between 8 and 1024, got {resolution}")
    if spec.source == "elpv":
        raw = load_elpv((res[0], res[1]), cache_dir)
        ds = Dataset(
            spec, raw.images, _elpv_labels(name, raw.probs), raw.modules, raw.types, _elpv_soft_labels(name, raw.probs)
        )
    else:
        images, labels, official = load_fashion_mnist(fmnist_root)
        groups = np.arange(len(labels), dtype=np.int64)
        if limit is not None:  # slice before resizing 70k images
            keep = stratified_subset(labels, limit, strata=official)
            images, labels, groups, official = images[keep], labels[keep], groups[keep], official[keep]
            limit = None
        ds = Dataset(spec, resize_images(images, res[0], res[1]), labels, groups, official)
    if limit is not None:
        ds = ds.subset(stratified_subset(ds.labels, limit, strata=ds.types))
    return ds
