"""The tensor frame codec: round trips, and every malformed input named precisely."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from shared.codec import MAGIC, CodecError, decode_frame, encode_frame

DTYPES = ["float32", "float16", "uint8", "int8", "int32", "int64", "float64"]


@settings(max_examples=150, deadline=None)
@given(
    arr=hnp.arrays(
        dtype=st.sampled_from(DTYPES),
        shape=hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=6),
    ),
    meta=st.dictionaries(st.text(max_size=8), st.one_of(st.integers(), st.text(max_size=8)), max_size=4),
    kind=st.integers(0, 255),
)
def test_round_trip_preserves_tensor_meta_and_kind(arr: np.ndarray, meta: dict, kind: int) -> None:
    frame = decode_frame(encode_frame(kind, meta, arr))
    assert frame.kind == kind
    assert frame.meta == meta
    assert frame.tensor is not None
    assert frame.tensor.dtype == arr.dtype
    assert frame.tensor.shape == arr.shape
    np.testing.assert_array_equal(frame.tensor, arr)


def test_frame_without_tensor() -> None:
    frame = decode_frame(encode_frame(2, {"a": 1}))
    assert frame.tensor is None and frame.meta == {"a": 1}


def test_big_endian_and_non_contiguous_inputs_are_normalised() -> None:
    arr = np.arange(12, dtype=">f4").reshape(3, 4).T
    out = decode_frame(encode_frame(1, {}, arr)).tensor
    np.testing.assert_array_equal(out, arr.astype("<f4"))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_crash_only_codec_error(data: bytes) -> None:
    try:
        decode_frame(data)
    except CodecError:
        pass


@settings(max_examples=200, deadline=None)
@given(cut=st.integers(0, 200))
def test_every_truncation_is_refused(cut: int) -> None:
    payload = encode_frame(1, {"x": "y"}, np.ones((2, 3, 4), np.float32))
    if cut >= len(payload):
        return
    with pytest.raises(CodecError):
        decode_frame(payload[:cut])


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"XXXX" + bytes(20), "bad magic"),
        (b"EF", "shorter than"),
        (MAGIC + bytes([1, 99, 1, 0]) + struct.pack("<II", 1, 0), "unknown dtype code 99"),
        (MAGIC + bytes([1, 1, 9, 0]) + bytes(64), "at most 8"),
        (MAGIC + bytes([1, 0, 0, 0]) + struct.pack("<I", 50) + b"{}", "runs past the end"),
        (MAGIC + bytes([1, 0, 0, 0]) + struct.pack("<I", 2) + b"[]", "JSON object"),
        (MAGIC + bytes([1, 0, 0, 0]) + struct.pack("<I", 2) + b"{x", "not valid JSON"),
        (MAGIC + bytes([1, 1, 1, 0]) + struct.pack("<II", 4, 2) + b"{}" + bytes(3), "needs 16"),
    ],
)
def test_malformed_frames_name_the_problem(payload: bytes, message: str) -> None:
    with pytest.raises(CodecError, match=message):
        decode_frame(payload)


def test_oversized_payload_refused_before_parsing() -> None:
    with pytest.raises(CodecError, match="limit"):
        decode_frame(b"\0" * 100, max_bytes=50)


def test_unsupported_dtype_refused_on_encode() -> None:
    with pytest.raises(CodecError, match="not supported"):
        encode_frame(1, {}, np.zeros(3, dtype=np.complex64))
