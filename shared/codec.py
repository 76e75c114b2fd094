"""Binary framing for messages that carry a tensor.

A frame is a small typed header followed by the tensor's raw bytes; tensors never travel as JSON
float lists. Layout (all integers little-endian):

    magic      4 bytes  b"EFT1"
    kind       1 byte   message kind (see ``shared.messages.MessageKind``)
    dtype      1 byte   tensor dtype code, 0 = no tensor
    ndim       1 byte   number of dimensions (0..8)
    reserved   1 byte   0
    shape      ndim x uint32
    meta_len   uint32   length of the JSON metadata that follows
    meta       meta_len bytes, UTF-8 JSON object (validated by a pydantic model on the caller's side)
    data       the tensor's bytes, C order; its length must equal prod(shape) * itemsize

``decode_frame`` checks every field against the bytes actually received and raises
``CodecError`` naming the first problem, so a malformed payload never reaches a model.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["MAGIC", "MAX_FRAME_BYTES", "CodecError", "Frame", "decode_frame", "encode_frame"]

MAGIC = b"EFT1"
MAX_NDIM = 8
# Escalations are single images; anything near this size is a bug or an attack.
MAX_FRAME_BYTES = 16 * 1024 * 1024

_FIXED = struct.Struct("<4sBBBB")
_U32 = struct.Struct("<I")

_DTYPES: dict[int, np.dtype[Any]] = {
    1: np.dtype("<f4"),
    2: np.dtype("<f2"),
    3: np.dtype("uint8"),
    4: np.dtype("int8"),
    5: np.dtype("<i4"),
    6: np.dtype("<i8"),
    7: np.dtype("<f8"),
}
_CODES: dict[np.dtype[Any], int] = {dt: code for code, dt in _DTYPES.items()}


class CodecError(ValueError):
    """A frame could not be encoded or decoded; the message says which field is wrong."""


@dataclass(frozen=True)
class Frame:
    """A decoded frame: its kind, its JSON metadata and an optional tensor."""

    kind: int
    meta: dict[str, Any]
    tensor: np.ndarray | None


def encode_frame(kind: int, meta: dict[str, Any], tensor: np.ndarray | None = None) -> bytes:
    """Encode ``meta`` and ``tensor`` into one frame."""
    if not 0 <= kind <= 255:
        raise CodecError(f"message kind {kind} does not fit in one byte")
    meta_bytes = json.dumps(meta, separators=(",", ":")).encode()
    if tensor is None:
        dtype_code, shape, data = 0, (), b""
    else:
        arr = np.asarray(tensor, order="C")
        dt = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
        code = _CODES.get(np.dtype(dt))
        if code is None:
            supported = ", ".join(str(d) for d in _DTYPES.values())
            raise CodecError(f"tensor dtype {arr.dtype} is not supported (supported: {supported})")
        if arr.ndim > MAX_NDIM:
            raise CodecError(f"tensor has {arr.ndim} dimensions; at most {MAX_NDIM} are supported")
        dtype_code, shape, data = code, arr.shape, arr.astype(dt, copy=False).tobytes()
    parts = [
        _FIXED.pack(MAGIC, kind, dtype_code, len(shape), 0),
        b"".join(_U32.pack(d) for d in shape),
        _U32.pack(len(meta_bytes)),
        meta_bytes,
        data,
    ]
    out = b"".join(parts)
    if len(out) > MAX_FRAME_BYTES:
        raise CodecError(f"frame is {len(out)} bytes; the limit is {MAX_FRAME_BYTES}")
    return out


def decode_frame(payload: bytes, *, max_bytes: int = MAX_FRAME_BYTES) -> Frame:
    """Decode one frame, validating every length against the bytes received."""
    n = len(payload)
    if n > max_bytes:
        raise CodecError(f"payload is {n} bytes; the limit is {max_bytes}")
    if n < _FIXED.size:
        raise CodecError(f"payload is {n} bytes, shorter than the {_FIXED.size}-byte frame header")
    magic, kind, dtype_code, ndim, _ = _FIXED.unpack_from(payload, 0)
    if magic != MAGIC:
        raise CodecError(f"bad magic {magic!r}; expected {MAGIC!r} (not an edgefed frame)")
    if ndim > MAX_NDIM:
        raise CodecError(f"header says {ndim} dimensions; at most {MAX_NDIM} are supported")
    if dtype_code != 0 and dtype_code not in _DTYPES:
        raise CodecError(f"unknown dtype code {dtype_code}")
    if dtype_code == 0 and ndim != 0:
        raise CodecError("header has a shape but no tensor dtype")
    pos = _FIXED.size
    if n < pos + 4 * ndim + 4:
        raise CodecError("payload is truncated inside the shape/metadata header")
    shape = tuple(_U32.unpack_from(payload, pos + 4 * i)[0] for i in range(ndim))
    pos += 4 * ndim
    (meta_len,) = _U32.unpack_from(payload, pos)
    pos += 4
    if pos + meta_len > n:
        raise CodecError(f"metadata length {meta_len} runs past the end of the {n}-byte payload")
    try:
        meta = json.loads(payload[pos : pos + meta_len])
    except (ValueError, RecursionError) as exc:  # bad JSON or UTF-8, a 5000-digit integer, deep nesting
        raise CodecError(f"metadata is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(meta, dict):
        raise CodecError("metadata must be a JSON object")
    pos += meta_len
    data = memoryview(payload)[pos:]
    if dtype_code == 0:
        if len(data):
            raise CodecError(f"{len(data)} trailing bytes after a frame without a tensor")
        return Frame(kind=kind, meta=meta, tensor=None)
    dtype = _DTYPES[dtype_code]
    expected = math.prod(shape) * dtype.itemsize  # Python ints: a crafted shape cannot overflow to a match
    if len(data) != expected:
        raise CodecError(
            f"tensor data is {len(data)} bytes but shape {list(shape)} of {dtype} needs {expected}"
        )
    tensor = np.frombuffer(data, dtype=dtype).reshape(shape)
    return Frame(kind=kind, meta=meta, tensor=tensor)
