"""shared.data: splits, partitions, IDX parsing, preprocessing — pure functions on synthetic data."""

from __future__ import annotations

import gzip
import io
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shared.bundle import InputSpec
from shared.data import (
    MAX_IMAGE_PIXELS,
    TASKS,
    Dataset,
    IdxFormatError,
    ImageDecodeError,
    PartitionError,
    UnknownTaskError,
    decode_image,
    get_task,
    partition_dirichlet,
    partition_elpv,
    pseudo_module_ids,
    read_idx,
    stratified_split,
    stratified_subset,
    to_model_input,
)
from shared.data.fashion_mnist import load_fashion_mnist


def _labels(n: int = 1000, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random(n) < 0.3).astype(np.int64)


def test_split_is_deterministic_disjoint_covering_and_stratified() -> None:
    y = _labels()
    a, b = stratified_split(y, seed=7), stratified_split(y, seed=7)
    for x, z in zip((a.train, a.calibration, a.test), (b.train, b.calibration, b.test), strict=True):
        np.testing.assert_array_equal(x, z)
    parts = np.concatenate([a.train, a.calibration, a.test])
    assert len(parts) == len(np.unique(parts)) == len(y)
    assert abs(len(a.test) - 200) <= 2 and abs(len(a.calibration) - 100) <= 2
    for part in (a.train, a.calibration, a.test):
        assert abs(y[part].mean() - y.mean()) < 0.01
    assert not np.array_equal(stratified_split(y, seed=8).test, a.test)


def test_split_stratifies_by_extra_strata_and_rejects_bad_fractions() -> None:
    y = _labels()
    kinds = np.where(np.arange(len(y)) < 400, "mono", "poly")
    s = stratified_split(y, strata=kinds)
    assert abs(np.mean(kinds[s.test] == "mono") - 0.4) < 0.01
    with pytest.raises(PartitionError, match="sum"):
        stratified_split(y, fractions=(0.5, 0.5, 0.5))
    with pytest.raises(PartitionError, match="shape"):
        stratified_split(y, strata=kinds[:10])


def test_stratified_subset_keeps_proportions() -> None:
    y = _labels()
    idx = stratified_subset(y, 100)
    assert len(idx) == 100 and len(np.unique(idx)) == 100
    assert round(y[idx].mean(), 2) == round(y.mean(), 2)
    np.testing.assert_array_equal(idx, stratified_subset(y, 100))
    with pytest.raises(PartitionError):
        stratified_subset(y, 0)


def test_pseudo_module_ids_chunk_runs_and_merge_small_remainders() -> None:
    types = np.array(["mono"] * 130 + ["poly"] * 72 + ["mono"] * 48)
    ids = pseudo_module_ids(types)
    # mono run of 130: 60 + 70 (remainder 10 merged); poly 72: one module; mono 48: one module.
    assert np.bincount(ids).tolist() == [60, 70, 72, 48]
    assert np.all(np.diff(ids) >= 0)


def _elpv_like(n_modules: int = 12) -> Dataset:
    types = np.array(["mono"] * 4 * 60 + ["poly"] * (n_modules - 4) * 60)
    groups = pseudo_module_ids(types)
    rng = np.random.default_rng(0)
    # Defect rate differs per module, as in real factories.
    labels = (rng.random(len(types)) < 0.1 + 0.6 * (groups % 3 == 0)).astype(np.int64)
    images = np.zeros((len(types), 8, 8), np.uint8)
    return Dataset(TASKS["elpv"], images, labels, groups, types)


@pytest.mark.parametrize("n_regions", [1, 2, 3, 5])
def test_partition_elpv_keeps_modules_whole(n_regions: int) -> None:
    ds = _elpv_like()
    regions = partition_elpv(ds, n_regions)
    assert len(regions) == n_regions
    allidx = np.concatenate(regions)
    assert len(allidx) == len(np.unique(allidx)) == len(ds)
    owner = {}
    for r, idx in enumerate(regions):
        assert len(idx) > 0
        for g in np.unique(ds.groups[idx]):
            assert owner.setdefault(int(g), r) == r, "a module was split between regions"
        if n_regions >= 2:
            assert len(np.unique(ds.types[idx])) == 1, "regions must not mix module types"


def test_partition_elpv_is_non_iid_and_respects_subset() -> None:
    ds = _elpv_like()
    regions = partition_elpv(ds, 3)
    assert [set(ds.types[r]) for r in regions] == [{"mono"}, {"poly"}, {"poly"}]
    rates = [ds.labels[r].mean() for r in regions]
    assert max(rates) - min(rates) > 0.05
    subset = np.arange(0, len(ds), 2)
    sub_regions = partition_elpv(ds, 3, indices=subset)
    assert set(np.concatenate(sub_regions)) == set(subset)
    with pytest.raises(PartitionError, match="modules"):
        partition_elpv(ds, 13)


def test_partition_dirichlet_skews_labels_and_covers_all() -> None:
    y = np.repeat(np.arange(10), 200)
    regions = partition_dirichlet(y, 10, alpha=0.3, seed=1)
    assert len(regions) == 10 and all(len(r) > 0 for r in regions)
    allidx = np.concatenate(regions)
    assert len(allidx) == len(np.unique(allidx)) == len(y)
    for a, b in zip(regions, partition_dirichlet(y, 10, alpha=0.3, seed=1), strict=True):
        np.testing.assert_array_equal(a, b)
    # Label skew: a typical region is dominated by a few classes (IID would give ~0.1 each).
    top_share = [np.bincount(y[r], minlength=10).max() / len(r) for r in regions]
    assert np.median(top_share) > 0.3
    iid = partition_dirichlet(y, 10, alpha=1000.0, seed=1)
    assert max(np.bincount(y[r], minlength=10).max() / len(r) for r in iid) < 0.2
    with pytest.raises(PartitionError, match="alpha"):
        partition_dirichlet(y, 3, alpha=0)


def _write_idx(path: Path, arr: np.ndarray, type_code: int = 0x08, gz: bool = True) -> None:
    header = bytes([0, 0, type_code, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    data = header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


def test_read_idx_parses_and_validates(tmp_path: Path) -> None:
    imgs = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "imgs.gz", imgs)
    np.testing.assert_array_equal(read_idx(tmp_path / "imgs.gz", expected_ndim=3), imgs)
    ints = np.array([1, -2, 300000], dtype=np.int32)
    _write_idx(tmp_path / "ints", ints, type_code=0x0C, gz=False)
    np.testing.assert_array_equal(read_idx(tmp_path / "ints"), ints)

    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(IdxFormatError, match="magic"):
        read_idx(tmp_path / "bad")
    with pytest.raises(IdxFormatError, match="dimensions"):
        read_idx(tmp_path / "imgs.gz", expected_ndim=1)
    (tmp_path / "short").write_bytes(gzip.compress(gzip.decompress((tmp_path / "imgs.gz").read_bytes())[:-3]))
    with pytest.raises(IdxFormatError, match="data bytes"):
        read_idx(tmp_path / "short")
    (tmp_path / "badgz.gz").write_bytes((tmp_path / "imgs.gz").read_bytes()[:-8])
    with pytest.raises(IdxFormatError, match="cannot read"):
        read_idx(tmp_path / "badgz.gz")


def test_fashion_mnist_missing_files_name_the_package(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)


def test_unknown_task_is_named() -> None:
    with pytest.raises(UnknownTaskError, match="known tasks: elpv, elpv4, fmnist"):
        get_task("mnist")


def test_to_model_input_resizes_and_normalises() -> None:
    spec = InputSpec(shape=[1, 1, 16, 16], mean=[0.5], std=[0.25])
    x = to_model_input(np.full((3, 40, 30), 255, np.uint8), spec)
    assert x.shape == (3, 1, 16, 16) and x.dtype == np.float32
    np.testing.assert_allclose(x, 2.0, atol=1e-6)  # (1 - 0.5) / 0.25
    single = to_model_input(np.zeros((16, 16), np.uint8), spec)
    assert single.shape == (1, 1, 16, 16)
    np.testing.assert_allclose(single, -2.0)
    with pytest.raises(ValueError, match="uint8"):
        to_model_input(np.zeros((16, 16), np.float32), spec)
    with pytest.raises(ValueError, match="shape"):
        to_model_input(np.zeros((1, 2, 16, 16), np.uint8), spec)


def test_to_model_input_matches_resize_then_normalise_at_target_size() -> None:
    """An edge image at full size must become the tensor a pre-resized training image became."""
    spec = InputSpec(shape=[1, 1, 8, 8], mean=[0.3], std=[0.2])
    big = np.random.default_rng(0).integers(0, 256, (60, 60), dtype=np.uint8)
    small = np.asarray(Image.fromarray(big).resize((8, 8), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(to_model_input(big, spec), to_model_input(small, spec))


def _png(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def test_decode_image_roundtrip_and_errors() -> None:
    spec = InputSpec(shape=[1, 1, 8, 8])
    img = np.random.default_rng(0).integers(0, 256, (20, 10), dtype=np.uint8)
    np.testing.assert_array_equal(decode_image(_png(img), spec), img)
    rgb = np.zeros((5, 5, 3), np.uint8)
    assert decode_image(_png(rgb, "JPEG"), spec).shape == (5, 5)
    with pytest.raises(ImageDecodeError, match="empty"):
        decode_image(b"", spec)
    with pytest.raises(ImageDecodeError, match="not a readable"):
        decode_image(b"\x89PNG\r\n\x1a\n garbage", spec)
    with pytest.raises(ImageDecodeError, match="not a readable"):
        decode_image(_png(img)[:40], spec)
    gif = io.BytesIO()
    Image.fromarray(img).save(gif, format="GIF")
    with pytest.raises(ImageDecodeError, match="GIF"):
        decode_image(gif.getvalue(), spec)


def test_decode_image_refuses_huge_images() -> None:
    spec = InputSpec(shape=[1, 1, 8, 8])
    side = int(MAX_IMAGE_PIXELS**0.5) + 10
    # A 1-bit PNG of this size is tiny on the wire but would be ~40 MB decoded.
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, format="PNG")
    with pytest.raises(ImageDecodeError, match="megapixels"):
        decode_image(buf.getvalue(), spec)


def test_elpv_soft_labels_keep_annotator_doubt_and_follow_subsets() -> None:
    from shared.data.tasks import _elpv_soft_labels

    probs = np.array([0.0, 1 / 3, 2 / 3, 1.0])
    soft = _elpv_soft_labels("elpv", probs)
    assert soft is not None and soft.dtype == np.float32 and soft.shape == (4, 2)
    np.testing.assert_allclose(soft[:, 1], probs, atol=1e-6)
    np.testing.assert_allclose(soft.sum(1), 1.0, atol=1e-6)
    # The hard label is the soft label's argmax (p = 1/2 never occurs in ELPV).
    np.testing.assert_array_equal(soft.argmax(1), (probs >= 0.5).astype(int))
    assert _elpv_soft_labels("elpv4", probs) is None  # its labels already are the levels

    ds = _elpv_like(4)
    assert ds.soft_labels is None and ds.subset(np.arange(3)).soft_labels is None
    with_soft = Dataset(ds.task, ds.images, ds.labels, ds.groups, ds.types, np.eye(2, dtype=np.float32)[ds.labels])
    sub = with_soft.subset(np.array([5, 1]))
    np.testing.assert_array_equal(sub.soft_labels, np.eye(2, dtype=np.float32)[ds.labels[[5, 1]]])
