"""Property-based tests of the tensor codec and the escalation messages built on it.

Round trips hold for every supported dtype and shape; and no byte string, however built (random,
a valid frame with bytes overwritten, a frame with arbitrary header fields, pathological JSON
metadata), makes the decoders raise anything but ``CodecError``. ``test_codec.py`` has the named
malformed cases; these look for the ones nobody thought of.
"""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from shared.codec import MAGIC, MAX_NDIM, CodecError, decode_frame, encode_frame
from shared.messages import (
    EscalationAnswer,
    EscalationRequest,
    MessageKind,
    decode_answer,
    decode_request,
    encode_answer,
    encode_request,
)

DTYPES = ["<f4", "<f2", "u1", "i1", "<i4", "<i8", "<f8"]
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ids = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=40)
arrays = hnp.arrays(
    dtype=st.sampled_from(DTYPES), shape=hnp.array_shapes(min_dims=1, max_dims=MAX_NDIM, min_side=0, max_side=4)
)
requests = st.builds(
    EscalationRequest,
    request_id=ids,
    device_id=ids,
    region=st.text(max_size=20),
    task=ids,
    edge_label=st.none() | st.integers(-(2**31), 2**31),
    edge_confidence=st.none() | st.floats(0, 1),
    sent_at=st.floats(0, 4e9),
    metadata=st.dictionaries(st.text(max_size=10), st.text(max_size=20), max_size=4),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20,
)


def _only_codec_errors(fn, payload: bytes) -> object:  # noqa: ANN001
    """Call ``fn(payload)``; any exception other than CodecError fails the test."""
    try:
        return fn(payload)
    except CodecError:
        return None


@FAST
@given(req=requests, arr=arrays)
def test_escalation_round_trip_keeps_request_and_tensor(req: EscalationRequest, arr: np.ndarray) -> None:
    got, tensor = decode_request(encode_request(req, arr))
    assert got == req
    assert tensor.dtype == arr.dtype and tensor.shape == arr.shape
    np.testing.assert_array_equal(tensor, arr)


@FAST
@given(
    ok=st.booleans(),
    label=st.none() | st.integers(0, 1000),
    probs=st.none() | hnp.arrays(np.float32, st.integers(1, 16), elements=st.floats(0, 1, width=32)),
    worker=st.text(max_size=20),
)
def test_answer_round_trip(ok: bool, label: int | None, probs: np.ndarray | None, worker: str) -> None:
    answer = EscalationAnswer(request_id="r", ok=ok, label=label, worker=worker, error=None if ok else "x")
    got, got_probs = decode_answer(encode_answer(answer, probs))
    assert got == answer
    if probs is None:
        assert got_probs is None
    else:
        np.testing.assert_array_equal(got_probs, probs)


@FAST
@given(meta=st.dictionaries(st.text(max_size=8), json_values, max_size=5))
def test_any_json_object_survives_as_metadata(meta: dict) -> None:
    assert decode_frame(encode_frame(7, meta)).meta == meta


@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_codec_error(data: bytes) -> None:
    for fn in (decode_frame, decode_request, decode_answer):
        _only_codec_errors(fn, data)
        _only_codec_errors(fn, MAGIC + data)  # past the magic, into the header


@FAST
@given(
    req=requests,
    arr=arrays,
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6),
    cut=st.none() | st.integers(0, 10_000),
    junk=st.binary(max_size=8),
)
def test_corrupted_valid_frames_raise_only_codec_error(
    req: EscalationRequest, arr: np.ndarray, edits: list[tuple[int, int]], cut: int | None, junk: bytes
) -> None:
    payload = bytearray(encode_request(req, arr))
    for pos, value in edits:
        payload[pos % len(payload)] = value
    mutated = bytes(payload[:cut] if cut is not None else payload) + junk
    result = _only_codec_errors(decode_request, mutated)
    if result is not None:  # a mutation that still decodes must still be self-consistent
        got, tensor = result
        assert isinstance(got, EscalationRequest) and tensor.nbytes <= len(mutated)


@FAST
@given(
    kind=st.integers(0, 255),
    dtype_code=st.integers(0, 255),
    shape=st.lists(st.integers(0, 2**32 - 1) | st.integers(0, 4), max_size=12),
    ndim_delta=st.integers(-2, 2),
    meta=st.binary(max_size=40) | st.builds(lambda v: json.dumps(v).encode(), json_values),
    meta_len_delta=st.integers(-3, 3),
    data=st.binary(max_size=64),
)
def test_arbitrary_header_fields_raise_only_codec_error(
    kind: int, dtype_code: int, shape: list[int], ndim_delta: int, meta: bytes, meta_len_delta: int, data: bytes
) -> None:
    ndim = min(255, max(0, len(shape) + ndim_delta))
    head = MAGIC + bytes([kind, dtype_code, ndim, 0]) + b"".join(struct.pack("<I", d) for d in shape)
    payload = head + struct.pack("<I", max(0, len(meta) + meta_len_delta)) + meta + data
    frame = _only_codec_errors(decode_frame, payload)
    if frame is not None and frame.tensor is not None:
        assert frame.tensor.nbytes == math.prod(frame.tensor.shape) * frame.tensor.itemsize <= len(payload)
    for fn in (decode_request, decode_answer):
        _only_codec_errors(fn, payload)


def _frame(meta: bytes, shape: tuple[int, ...] = (), dtype_code: int = 0, data: bytes = b"") -> bytes:
    head = MAGIC + bytes([int(MessageKind.ESCALATE), dtype_code, len(shape), 0])
    return head + b"".join(struct.pack("<I", d) for d in shape) + struct.pack("<I", len(meta)) + meta + data


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        (_frame(b"[" * 100_000), "not valid JSON"),  # deep nesting: RecursionError inside json
        (_frame(b'{"a":' * 50_000 + b"1" + b"}" * 50_000), "not valid JSON"),
        (_frame(b'{"a":' + b"9" * 5000 + b"}"), "not valid JSON"),  # int digit limit: a plain ValueError
        (_frame(b"{}", (2**31, 2**31, 4), 3), "needs"),  # int64 product overflows to 0 bytes
        (_frame(b"{}", (2**32 - 1,) * 8, 7, bytes(8)), "needs"),
        (_frame(b"\xff\xfe{}"), "not valid JSON"),
    ],
    ids=["deep-array", "deep-object", "huge-int", "shape-overflow", "huge-shape", "bad-utf"],
)
def test_pathological_frames_are_codec_errors(payload: bytes, needle: str) -> None:
    with pytest.raises(CodecError, match=needle):
        decode_frame(payload)


@FAST
@given(extra=st.integers(1, 64), limit=st.integers(16, 256))
def test_payloads_over_the_limit_are_refused_before_parsing(extra: int, limit: int) -> None:
    with pytest.raises(CodecError, match="limit"):
        decode_frame(b"\0" * (limit + extra), max_bytes=limit)


@FAST
@given(arr=arrays)
def test_encode_refuses_only_with_codec_error(arr: np.ndarray) -> None:
    assume(arr.size < 10_000)
    try:
        encode_frame(1, {}, arr.astype(arr.dtype.newbyteorder(">")))
    except CodecError:
        pytest.fail("a big-endian array of a supported dtype must be encodable")
    with pytest.raises(CodecError, match="not supported"):
        encode_frame(1, {}, np.zeros(arr.shape, np.complex64))
