"""P8: model swap under load — no request may fail or go missing while the agent changes bundles.

``clients`` threads post /v1/infer continuously while the agent is moved to a new bundle version
``swaps`` times the way production does it: the new signed version is pushed to the hub (which
assigns the newest version) and the retained ``edgefed/v1/{device}/assignment`` message announces
it; the agent fetches, verifies, loads and swaps. A swap window runs from the announcement until
the agent's /healthz reports the new version, plus ``settle_s``.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from shared.bench.common import BenchResult, Target, summarize
from shared.bench.models import BenchModels, EvalData, reversion_bundle

__all__ = ["run_p8"]


def run_p8(models: BenchModels, data: EvalData, *, swaps: int = 3, clients: int = 4, gap_s: float = 3.0,
           settle_s: float = 0.5, swap_timeout_s: float = 30.0) -> BenchResult:
    from shared.bench.agentload import Hammer, start_rig
    from shared.bench.stack import Stack
    from shared.bundle import pack_bundle
    from shared.rollouts import assign_now

    name = models.bundle.manifest.name
    base = models.bundle.manifest.version
    result = BenchResult("edge/p8", {"swaps": swaps, "clients": clients, "gap_s": gap_s, "settle_s": settle_s,
                                     "bundle": f"{name}:{base}", "mechanism": "push + hub assignment (retained)"})
    windows: list[tuple[float, float]] = []
    swap_s: list[float] = []
    with tempfile.TemporaryDirectory(prefix="edgefed-bench-p8-") as tmp, Stack(Path(tmp) / "stack") as stack:
        rig = start_rig(stack, models, data.test_x, device_id="bench-swap")
        proc, url = stack.agent(rig.device_id, rig.agent_args)
        proc.start()
        stack.wait(proc, f"{url}/healthz", 60)
        hammer = Hammer(url, rig.bodies, clients=clients).start()
        try:
            time.sleep(gap_s)
            for k in range(1, swaps + 1):
                version = f"{base}.bench{k}"
                bundle = reversion_bundle(models.bundle, version, Path(tmp) / f"v{k}", models.signing_key)
                t0 = time.perf_counter()
                with stack.client() as client:
                    client.push_bundle(pack_bundle(bundle.path))
                    # Pushing moves no device: the hub pins it and publishes the retained assignment.
                    assign_now(client, version, [rig.device_id], model_name=name)
                deadline = time.monotonic() + swap_timeout_s
                while httpx.get(f"{url}/healthz", timeout=5).json().get("model_version") != version:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"agent did not switch to {version} within {swap_timeout_s} s:\n"
                                           f"{proc.log_tail()}")
                    time.sleep(0.02)
                t1 = time.perf_counter()
                swap_s.append(t1 - t0)
                windows.append((t0, t1 + settle_s))
                time.sleep(gap_s)
        finally:
            hammer.stop()
    recs = hammer.records
    t0s = np.array([r[0] for r in recs])
    lat = np.array([(r[1] - r[0]) * 1000.0 for r in recs])
    ok = np.array([r[2] == 200 for r in recs])
    during = np.zeros(len(recs), bool)
    for a, b in windows:
        during |= (t0s >= a) & (t0s <= b)
    errors = sorted({r[4] or f"HTTP {r[2]}" for r in recs if r[2] != 200})[:10]
    versions = sorted({r[3] for r in recs if r[3]})
    d, o = summarize(lat[during & ok]), summarize(lat[~during & ok])
    result.measurements = {
        "requests": len(recs),
        "failed": int((~ok).sum()),
        "failed_during_swaps": int((~ok & during).sum()),
        "errors": errors,
        "versions_served": versions,
        "swap_seconds": [round(s, 3) for s in swap_s],
        "latency_ms_during_swaps": d,
        "latency_ms_outside_swaps": o,
        "p99_during_over_outside": round(d["p99"] / o["p99"], 3) if d["n"] and o["n"] else None,
    }
    result.targets = [
        Target("P8", f"failed or dropped requests over {swaps} swaps", float((~ok).sum()), 0, "<=", ""),
        Target("P8", "versions served (swaps + 1)", float(len(versions)), float(swaps + 1), ">=", ""),
    ]
    result.notes.append(f"latency p99 during swaps {d['p99']} ms vs outside {o['p99']} ms")
    return result
