"""Where a run's data comes from: the task's reference set (server side) and a region's data (client side).

Reference set (evaluation of the global model, server side): ``spec.reference_data`` when given (an
``.npz`` with ``x``, float32 model inputs N×C×H×W, and ``y``, int labels), else the test part of the
task's standard split (``shared.data.task_split``) at the checkpoint's input resolution, the same
holdout the model factory reports; ``spec.reference_limit`` takes a stratified slice first.

Region data (client side): every ``learning*.sqlite3`` file below the SuperNode's data directory
(edge agents' learning stores, read with ``edge_agent.learning_store.read_cases``) and every
``*.npz`` file with ``x``/``y`` arrays (labelled data a site brings; the benchmark's partitions).
Decoded learning stores are cached between rounds under ``<data-dir>/.edgefed-cache``
(``federation.region_cache``), keyed by each store's bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from federation.spec import FedRunSpec

__all__ = ["DataError", "load_reference", "load_region_data", "read_npz"]


class DataError(ValueError):
    """Data that a run needs is missing or unusable; the message says which and why."""


def read_npz(path: Path, num_classes: int, input_chw: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``x`` (float32 N×C×H×W matching ``input_chw``) and ``y`` (int64 in range) from an ``.npz`` file."""
    try:
        with np.load(path, allow_pickle=False) as z:
            x, y = np.asarray(z["x"], dtype=np.float32), np.asarray(z["y"], dtype=np.int64)
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"{path}: not an .npz file with arrays 'x' and 'y': {exc}") from None
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(input_chw) or len(x) != len(y):
        raise DataError(f"{path}: x has shape {x.shape} and y {y.shape}; expected N×{input_chw} and N labels")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(f"{path}: labels outside 0..{num_classes - 1}")
    return x, y


def load_reference(
    spec: FedRunSpec, input_chw: tuple[int, int, int], num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """The reference validation set for ``spec`` (see the module docstring)."""
    if spec.reference_data is not None:
        x, y = read_npz(Path(spec.reference_data), num_classes, input_chw)
        if spec.reference_limit is not None:
            x, y = x[: spec.reference_limit], y[: spec.reference_limit]
        return x, y
    from shared.data import UnknownTaskError, load_task, task_split, to_model_input

    try:
        ds = load_task(spec.task, resolution=input_chw[1:], limit=spec.reference_limit)
    except UnknownTaskError as exc:
        raise DataError(f"{exc}; give the run a reference_data .npz for a task of your own") from None
    except FileNotFoundError as exc:
        raise DataError(f"reference data for task {spec.task!r} is not available: {exc}") from None
    if ds.task.num_classes != num_classes:
        raise DataError(f"task {spec.task!r} has {ds.task.num_classes} classes, the checkpoint {num_classes}")
    test = task_split(ds, seed=0).test
    return to_model_input(ds.images[test], ds.input_spec), ds.labels[test]


def load_region_data(data_dir: Path, *, task: str, num_classes: int, input_chw: tuple[int, int, int]) -> tuple[
    Any, dict[str, Any]
]:
    """All of a region's usable cases as ``federation.training.LocalData``, and what was read/skipped."""
    import torch

    from edge_agent.learning_store import read_cases
    from federation.region_cache import CACHE_DIR, cached_store
    from federation.training import LocalData, cases_to_data

    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"data directory {data_dir} does not exist")
    parts: list[LocalData] = []
    info: dict[str, Any] = {"stores": 0, "npz": 0, "skipped": {}, "cache_hits": 0}
    params = {"task": task, "num_classes": num_classes, "input_chw": list(input_chw)}
    for store in sorted(data_dir.rglob("learning*.sqlite3")):
        def decode(store: Path = store) -> tuple[dict[str, np.ndarray], dict[str, int]]:
            d, skipped = cases_to_data(read_cases(store), task=task, num_classes=num_classes, input_chw=input_chw)
            return {"x": d.x.numpy(), "hard": d.hard.numpy(), "soft": d.soft.numpy()}, skipped

        arrays, skipped, hit = cached_store(data_dir, store, params, decode)
        data = LocalData(*(torch.from_numpy(arrays[k]) for k in ("x", "hard", "soft")))
        info["stores"] += 1
        info["cache_hits"] += int(hit)
        for k, v in skipped.items():
            info["skipped"][k] = info["skipped"].get(k, 0) + v
        if len(data):
            parts.append(data)
    for path in sorted(data_dir.rglob("*.npz")):
        if CACHE_DIR in path.relative_to(data_dir).parts:
            continue  # decoded learning stores (federation.region_cache), not a site's data
        x, y = read_npz(path, num_classes, input_chw)
        info["npz"] += 1
        parts.append(LocalData.from_labels(x, y, num_classes))
    if not parts:
        raise DataError(
            f"no usable cases for task {task!r} under {data_dir} "
            f"({info['stores']} learning store(s), {info['npz']} .npz file(s), skipped: {info['skipped'] or 'none'})"
        )
    data = LocalData(
        torch.cat([p.x for p in parts]), torch.cat([p.hard for p in parts]), torch.cat([p.soft for p in parts])
    )
    return data, info
