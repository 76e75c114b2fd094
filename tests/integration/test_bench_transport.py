"""The transport benchmark in a tiny configuration: real mosquitto, a real hub, a few round trips."""

from __future__ import annotations

import pytest

from shared.bench.transport import PAYLOADS, run_p3

pytestmark = pytest.mark.integration


def test_p3_measures_overhead_and_raw_echo_per_payload() -> None:
    r = run_p3(requests=5, warmup=2)
    sizes = r.measurements["payloads"]
    assert set(sizes) == set(PAYLOADS)
    for name, side in PAYLOADS.items():
        s = sizes[name]
        assert s["failed"] == 0
        assert s["request_bytes"] > 4 * side * side  # the tensor travels as raw float32 bytes
        assert s["overhead_ms"]["n"] == 5 and s["raw_echo_round_trip_ms"]["n"] == 5
        # Overhead is the round trip minus the model's time: smaller than the round trip, never negative.
        assert 0 < s["overhead_ms"]["p50"] < s["hub_round_trip_ms"]["p50"]
    assert len(r.targets) == 2 * len(PAYLOADS)
