"""Deterministic splits and region partitions, as index arrays. Pure functions of their inputs.

- ``stratified_split``: train / calibration / test, stratified by label (and optional extra strata).
- ``stratified_subset``: a small deterministic stratified slice (tests, quick runs).
- ``partition_elpv``: regions = factories; split by module type, then by module, never splitting a
  module, which makes regions naturally non-IID (mono and poly cells look and fail differently).
- ``partition_dirichlet``: the usual Dirichlet label skew (NIID-Bench) with every region non-empty.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from shared.data.tasks import Dataset

__all__ = [
    "Split",
    "PartitionError",
    "stratified_split",
    "stratified_subset",
    "partition_groups",
    "partition_elpv",
    "task_split",
    "partition_dirichlet",
]


class PartitionError(ValueError):
    """A split or partition cannot be made from the given data and parameters."""


@dataclass(frozen=True)
class Split:
    """Sorted index arrays into one dataset; pairwise disjoint, together covering it."""

    train: np.ndarray
    calibration: np.ndarray
    test: np.ndarray


def _strata_keys(labels: np.ndarray, strata: np.ndarray | None) -> np.ndarray:
    labels = np.asarray(labels)
    if strata is None:
        return labels.astype(str)
    strata = np.asarray(strata)
    if strata.shape != labels.shape:
        raise PartitionError(f"strata has shape {strata.shape}, labels {labels.shape}; they must match")
    return np.char.add(np.char.add(labels.astype(str), "|"), strata.astype(str))


def stratified_split(
    labels: np.ndarray,
    *,
    seed: int = 0,
    fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
    strata: np.ndarray | None = None,
) -> Split:
    """Split indices into train / calibration / test with ``fractions`` in every stratum.

    Strata are the labels, or (label, ``strata``) pairs when given. Within a stratum the counts are
    rounded; a stratum too small to give every part an item gives its items to train first.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise PartitionError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
    keys = _strata_keys(labels, strata)
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[], [], []]
    for key in np.unique(keys):  # sorted, so the draw order is deterministic
        idx = rng.permutation(np.flatnonzero(keys == key))
        n = len(idx)
        n_cal = int(round(n * fractions[1]))
        n_test = int(round(n * fractions[2]))
        if n_cal + n_test >= n:  # keep at least one training item per stratum
            n_test = min(n_test, max(n - 1, 0))
            n_cal = min(n_cal, max(n - 1 - n_test, 0))
        parts[0].append(idx[: n - n_cal - n_test])
        parts[1].append(idx[n - n_cal - n_test : n - n_test])
        parts[2].append(idx[n - n_test :])
    train, cal, test = (
        np.sort(np.concatenate(p)).astype(np.int64) if p else np.empty(0, np.int64) for p in parts
    )
    return Split(train=train, calibration=cal, test=test)


def stratified_subset(
    labels: np.ndarray, limit: int, *, seed: int = 0, strata: np.ndarray | None = None
) -> np.ndarray:
    """``limit`` sorted indices with the strata's proportions kept (largest remainders), deterministic."""
    keys = _strata_keys(labels, strata)
    if limit <= 0:
        raise PartitionError(f"limit must be positive, got {limit}")
    if limit >= len(keys):
        return np.arange(len(keys), dtype=np.int64)
    uniq, counts = np.unique(keys, return_counts=True)
    exact = counts * (limit / len(keys))
    take = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - take), kind="stable")[: limit - take.sum()]:
        take[i] += 1
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(keys == k))[:t] for k, t in zip(uniq, take, strict=True)]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def task_split(
    dataset: Dataset, seed: int = 0, fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)
) -> Split:
    """The standard split of a task's dataset: stratified by label and type (ELPV: mono/poly)."""
    return stratified_split(dataset.labels, seed=seed, fractions=fractions, strata=dataset.types)


def _contiguous_groups(sizes: np.ndarray, k: int) -> list[np.ndarray]:
    """Cut a sequence of item sizes into ``k`` contiguous, non-empty runs of similar total size."""
    cum = np.cumsum(sizes)
    cuts = [0]
    for j in range(1, k):
        target = cum[-1] * j / k
        lo = cuts[-1] + 1  # each run keeps at least one item
        hi = len(sizes) - (k - j)  # leave at least one item for every later run
        candidates = np.arange(lo, hi + 1)
        cuts.append(int(candidates[np.argmin(np.abs(cum[candidates - 1] - target))]))
    cuts.append(len(sizes))
    return [np.arange(a, b) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


def partition_groups(groups: np.ndarray, kinds: np.ndarray, n_regions: int) -> list[np.ndarray]:
    """Partition items into regions: first by kind, then by whole groups, never splitting a group.

    Every kind gets at least one region when ``n_regions`` allows; further regions go one at a time
    to the kind with the most items per region. Within a kind, groups (in id order) are cut into
    contiguous runs of similar item count. Returns sorted index arrays, ordered by kind then run.
    """
    groups, kinds = np.asarray(groups), np.asarray(kinds)
    if groups.shape != kinds.shape or groups.ndim != 1:
        raise PartitionError(f"groups {groups.shape} and kinds {kinds.shape} must be equal-length vectors")
    n_groups = len(np.unique(groups))
    if not 1 <= n_regions <= n_groups:
        raise PartitionError(
            f"n_regions must be between 1 and the number of modules ({n_groups}), got {n_regions}"
        )
    for g in np.unique(groups):
        if len(np.unique(kinds[groups == g])) > 1:
            raise PartitionError(
                f"module {g} holds items of more than one type; cannot assign it to one region"
            )
    if n_regions == 1:
        return [np.arange(len(groups), dtype=np.int64)]
    kind_names = sorted(np.unique(kinds).tolist())
    kind_groups = {k: np.unique(groups[kinds == k]) for k in kind_names}
    kind_items = {k: int(np.sum(kinds == k)) for k in kind_names}
    alloc = dict.fromkeys(kind_names, 0)
    for _ in range(n_regions):
        open_kinds = [k for k in kind_names if alloc[k] < len(kind_groups[k])]
        # Kinds without a region first, then the kind with the most items per region.
        k = max(open_kinds, key=lambda k: (alloc[k] == 0, kind_items[k] / max(alloc[k], 1)))
        alloc[k] += 1
    regions: list[np.ndarray] = []
    for k in kind_names:
        if alloc[k] == 0:
            continue
        ids = kind_groups[k]
        sizes = np.array([np.sum(groups == g) for g in ids])
        for run in _contiguous_groups(sizes, alloc[k]):
            regions.append(np.flatnonzero(np.isin(groups, ids[run])).astype(np.int64))
    return regions


def partition_elpv(dataset: Dataset, n_regions: int, indices: np.ndarray | None = None) -> list[np.ndarray]:
    """ELPV regions (factories): by module type, then by module; modules are never split.

    ``indices`` restricts the partition to a subset (e.g. the train split); the result holds
    indices into ``dataset``. 2 regions = mono / poly; 3 = mono / poly half A / poly half B.
    """
    idx = np.arange(len(dataset), dtype=np.int64) if indices is None else np.asarray(indices, dtype=np.int64)
    parts = partition_groups(dataset.groups[idx], dataset.types[idx], n_regions)
    return [np.sort(idx[p]) for p in parts]


def partition_dirichlet(
    labels: np.ndarray,
    n_regions: int,
    alpha: float,
    seed: int = 0,
    *,
    min_size: int = 1,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """Dirichlet(``alpha``) label skew: each class is spread over regions by its own draw.

    Draws are repeated until every region holds at least ``min_size`` items (as in NIID-Bench).
    Returns ``n_regions`` sorted, disjoint index arrays covering all items.
    """
    labels = np.asarray(labels)
    if n_regions < 1:
        raise PartitionError(f"n_regions must be at least 1, got {n_regions}")
    if alpha <= 0:
        raise PartitionError(f"alpha must be positive, got {alpha}")
    if len(labels) < n_regions * min_size:
        raise PartitionError(f"{len(labels)} items cannot give {n_regions} regions {min_size} items each")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(max_tries):
        buckets: list[list[np.ndarray]] = [[] for _ in range(n_regions)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            props = rng.dirichlet(np.full(n_regions, alpha))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
            for r, part in enumerate(np.split(idx, cuts)):
                buckets[r].append(part)
        regions = [np.sort(np.concatenate(b)).astype(np.int64) for b in buckets]
        if min(len(r) for r in regions) >= min_size:
            return regions
    raise PartitionError(
        f"no Dirichlet({alpha}) draw in {max_tries} tries gave all {n_regions} regions >= {min_size} items; "
        "use a larger alpha or fewer regions"
    )
