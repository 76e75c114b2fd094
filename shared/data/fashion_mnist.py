"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (gzipped IDX files), numpy only."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

__all__ = ["DEFAULT_ROOT", "FMNIST_LABELS", "IdxFormatError", "read_idx", "load_fashion_mnist"]

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
FMNIST_LABELS = [
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle-boot",
]
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# IDX type codes (third magic byte) and their big-endian numpy dtypes.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class IdxFormatError(ValueError):
    """A file is not a well-formed IDX file of the expected kind."""


def read_idx(path: Path, expected_ndim: int | None = None) -> np.ndarray:
    """Parse an IDX file (gzipped or not): magic ``00 00 <type> <ndim>``, big-endian dims, data."""
    path = Path(path)
    try:
        data = path.read_bytes()
        if data[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
            data = gzip.decompress(data)
    except (OSError, EOFError) as exc:  # gzip raises BadGzipFile (an OSError) or EOFError when truncated
        raise IdxFormatError(f"{path}: cannot read: {exc}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise IdxFormatError(f"{path}: bad magic number {data[:4].hex() or '(empty)'}; not an IDX file")
    type_code, ndim = data[2], data[3]
    if type_code not in _IDX_DTYPES:
        raise IdxFormatError(f"{path}: unknown IDX data type 0x{type_code:02x}")
    if expected_ndim is not None and ndim != expected_ndim:
        raise IdxFormatError(f"{path}: IDX file has {ndim} dimensions, expected {expected_ndim}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IdxFormatError(f"{path}: truncated IDX header")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[type_code])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise IdxFormatError(
            f"{path}: IDX header says {dims} ({expected} data bytes) but the file has {len(data) - header}"
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="))


def load_fashion_mnist(root: Path = DEFAULT_ROOT) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All 70,000 images (uint8 N×28×28), labels (int64) and the official split ("train"/"test")."""
    root = Path(root)
    missing = [name for pair in _FILES.values() for name in pair if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files missing under {root}: {', '.join(missing)}; "
            "install them with `apt-get install dataset-fashion-mnist`"
        )
    images, labels, splits = [], [], []
    for split, (img_name, lbl_name) in _FILES.items():
        imgs = read_idx(root / img_name, expected_ndim=3)
        lbls = read_idx(root / lbl_name, expected_ndim=1)
        if imgs.dtype != np.uint8 or len(imgs) != len(lbls):
            raise IdxFormatError(
                f"{root / img_name}: {len(imgs)} images of {imgs.dtype} but {len(lbls)} labels"
            )
        if lbls.size and (lbls.min() < 0 or lbls.max() >= len(FMNIST_LABELS)):
            raise IdxFormatError(f"{root / lbl_name}: labels outside 0..{len(FMNIST_LABELS) - 1}")
        images.append(imgs)
        labels.append(lbls.astype(np.int64))
        splits.append(np.full(len(lbls), split))
    return np.concatenate(images), np.concatenate(labels), np.concatenate(splits)
