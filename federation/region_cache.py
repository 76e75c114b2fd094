"""Decoded learning stores, cached between rounds as ``.npz`` files keyed by the store's content.

Flower starts a new ClientApp process for every message, so without a cache every round decodes
every case of a region's learning stores again (SQLite rows → codec frames → resized tensors). The
cache keeps, per store and per (task, classes, input shape), the decoded training arrays in
``<data-dir>/.edgefed-cache/<name>.npz`` together with the SHA-256 of the store's bytes (the SQLite
file and its ``-wal`` file). A store whose bytes changed (new cases, labels, evictions, a checkpoint
of the WAL) is decoded again and its cache file replaced; the cache never answers for other bytes.

The digest is taken before and after decoding; a cache file is only written when both agree (a
store that an agent writes to during the read is decoded again next round). A data directory that
is not writable simply goes without a cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["CACHE_DIR", "store_digest", "cached_store"]

log = logging.getLogger(__name__)

CACHE_DIR = ".edgefed-cache"
_FORMAT = 1


def store_digest(store: Path) -> str:
    """SHA-256 over a SQLite store's bytes and those of its ``-wal`` file (if any)."""
    h = hashlib.sha256()
    for path in (store, store.with_name(store.name + "-wal")):
        try:
            with open(path, "rb") as f:
                h.update(path.name.encode() + b"\0")
                h.update(hashlib.file_digest(f, "sha256").digest())
        except FileNotFoundError:
            continue
    return h.hexdigest()


def _cache_path(data_dir: Path, store: Path, params: dict[str, Any]) -> Path:
    ident = json.dumps({"store": str(store.relative_to(data_dir)), **params, "format": _FORMAT}, sort_keys=True)
    return data_dir / CACHE_DIR / f"{hashlib.sha256(ident.encode()).hexdigest()[:24]}.npz"


def cached_store(
    data_dir: Path,
    store: Path,
    params: dict[str, Any],
    decode: Callable[[], tuple[dict[str, np.ndarray], dict[str, int]]],
) -> tuple[dict[str, np.ndarray], dict[str, int], bool]:
    """The decoded arrays and skip counts of ``store``: from the cache if its bytes are unchanged, else
    ``decode()`` (then cached). ``params`` (task, classes, input shape) are part of the cache file's name.
    Returns ``(arrays, skipped, hit)``.
    """
    path = _cache_path(data_dir, store, params)
    digest = store_digest(store)
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["digest"]) == digest:
                arrays = {k: z[k] for k in z.files if k not in ("digest", "skipped")}
                skipped = json.loads(str(z["skipped"]))
                return arrays, skipped, True
    except (OSError, ValueError, KeyError):
        pass  # no cache file yet, or an unreadable one: decode
    arrays, skipped = decode()
    if store_digest(store) != digest:
        log.info("learning store %s changed while it was read; not caching it", store)
        return arrays, skipped, False
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(f, digest=np.array(digest), skipped=np.array(json.dumps(skipped)), **arrays)
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("cannot cache decoded learning store %s under %s: %s", store, path.parent, exc)
        with contextlib.suppress(OSError):
            tmp.unlink()
    return arrays, skipped, False
