"""The ELPV solar-cell dataset (PyPI ``elpv-dataset``), resized and cached outside the repository.

The images are CC BY-NC-SA 4.0: they are read from the installed package at run time and the
resized copies live only in a user cache directory, never in the repository.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.data.preprocess import resize_images

__all__ = ["CELLS_PER_MODULE", "ElpvRaw", "default_cache_dir", "pseudo_module_ids", "load_elpv"]

log = logging.getLogger(__name__)

CELLS_PER_MODULE = 60
_CACHE_FORMAT = 1


@dataclass(frozen=True)
class ElpvRaw:
    images: np.ndarray  # uint8 N×H×W
    probs: np.ndarray  # float64 N, defect probability in {0, 1/3, 2/3, 1}
    types: np.ndarray  # str N, "mono" or "poly"
    modules: np.ndarray  # int64 N, pseudo-module id (see pseudo_module_ids)


def default_cache_dir() -> Path:
    """``~/.cache/edgefed``: outside any repository (entry points may pass another directory)."""
    return Path.home() / ".cache" / "edgefed"


def pseudo_module_ids(types: np.ndarray, cells_per_module: int = CELLS_PER_MODULE) -> np.ndarray:
    """Derive a module id per cell from the order of cells and their module type.

    The package carries no module id, but cells are numbered in extraction order, module by
    module, and the module type changes only between modules. So within each contiguous run of the
    same type, consecutive chunks of ``cells_per_module`` (60, a 6×10 module) cells are taken as one
    module. A run's remainder becomes a module of its own when it holds at least half a module, and
    is merged into the run's last module otherwise (so a stray partial chunk never becomes a
    "module" of a few cells). On the published dataset this yields 44 modules, the number the
    dataset's authors report. Ids are consecutive integers in cell order.
    """
    types = np.asarray(types)
    ids = np.empty(len(types), dtype=np.int64)
    next_id = 0
    start = 0
    while start < len(types):
        end = start
        while end < len(types) and types[end] == types[start]:
            end += 1
        run = end - start
        n_full, rest = divmod(run, cells_per_module)
        n_modules = max(1, n_full + (1 if rest * 2 >= cells_per_module else 0))
        for i in range(run):
            ids[start + i] = next_id + min(i // cells_per_module, n_modules - 1)
        next_id += n_modules
        start = end
    return ids


def _load_from_package() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    try:
        from elpv_dataset.utils import load_dataset
    except ImportError:
        raise FileNotFoundError(
            "the ELPV dataset is not installed; install it with `pip install elpv-dataset` "
            "(part of the edgefed[hub] extra)"
        ) from None
    images, probs, types = load_dataset()
    return (
        np.asarray(images, dtype=np.uint8),
        np.asarray(probs, dtype=np.float64),
        np.asarray(types, dtype=str),
    )


def load_elpv(resolution: tuple[int, int], cache_dir: Path | None = None) -> ElpvRaw:
    """All 2,624 cells resized to ``resolution`` (height, width), cached as ``.npz`` per resolution.

    The first call per resolution decodes the package's PNGs (several seconds); later calls read
    the cache. A cache file that cannot be read is rebuilt.
    """
    h, w = resolution
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache / f"elpv-v{_CACHE_FORMAT}-{h}x{w}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                return ElpvRaw(z["images"], z["probs"], z["types"].astype(str), z["modules"])
        except (OSError, ValueError, KeyError) as exc:
            log.warning("ELPV cache %s is unreadable (%s); rebuilding it", path, exc)
    images, probs, types = _load_from_package()
    raw = ElpvRaw(resize_images(images, h, w), probs, types, pseudo_module_ids(types))
    cache.mkdir(parents=True, exist_ok=True)
    # Write then rename, so a concurrent reader never sees a half-written cache file.
    fd, tmp = tempfile.mkstemp(prefix=path.stem, suffix=".npz.tmp", dir=cache)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(
                fh, images=raw.images, probs=raw.probs, types=raw.types.astype("U4"), modules=raw.modules
            )
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("cached ELPV at %dx%d in %s", h, w, path)
    return raw
