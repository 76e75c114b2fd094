"""P9, the loop: one federated round on the regions' hard cases, and how far the edge's escalations fall.

On ELPV regions (factories), with the demo's stack (``shared.demo.start_loop_stack``: mosquitto, a
Flower SuperLink + one SuperNode per region, ``hub serve`` with federation, one ``agent run`` per
region) and the demo's helpers:

1. phase A: part of each region's test cases streams through its agent; unsure cases are escalated to
   the cloud model and land, with its answer, in the agent's learning store; inspectors confirm the
   true label of a share of the escalated ones (``POST /v1/feedback``);
2. one federated round (FedAvg by default) over the regions' learning stores through the hub API; the
   hub gates, compresses and registers the new edge version;
3. phase B (never trained on) streams through the agents still on the old version (after the round,
   so nothing of it can reach training), the new version is deployed to every agent
   (``shared.rollouts.assign_now``), and phase B streams again.

"Escalation rate at equal accuracy": from the per-case edge labels and confidences the agents reported
on phase B and the cloud model's answers for the same cases (the hub's REST predict), the cascade that
escalates the k least confident cases answers those with the cloud and the rest with the edge; the
measure is the smallest k/n at which the cascade reaches the target accuracy, the old version's cascade
accuracy at the agents' threshold. Target P9: the new version's rate ≥ 25 % lower (relative) than the
old one's.
"""

from __future__ import annotations

import shutil
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

import numpy as np

from shared.bench.common import BenchResult, Target

__all__ = ["run_p9"]

P9_DROP = 0.25


def run_p9(work_dir: Path, *, models_dir: Path | None = None, regions: tuple[str, ...] | None = None,
           rounds: int = 1, local_epochs: int = 6, lr: float = 3e-4, strategy: str = "fedavg",
           feedback_share: float = 0.5, gate_min_improvement_pt: float = -1.0) -> BenchResult:
    """Run the loop once and measure the escalation rate at equal accuracy before and after the round."""
    from shared.data.tasks import load_task
    from shared.demo import (
        REGIONS,
        FedSettings,
        cloud_predict,
        compare_scores,
        compare_versions,
        live_scores,
        run_federation,
        send_feedback,
        split_phases,
        start_loop_stack,
        stream,
        wait_for_version,
    )
    from shared.rollouts import assign_now

    regions = tuple(regions or REGIONS)
    settings = FedSettings(strategy=strategy, rounds=rounds, local_epochs=local_epochs, lr=lr,
                           gate_min_improvement_pt=gate_min_improvement_pt)
    result = BenchResult(
        benchmark="fed-p9",
        settings={"task": "elpv", "regions": list(regions), "federation": asdict(settings),
                  "feedback_share_of_escalated": feedback_share, "models_dir": str(models_dir or work_dir / "models")},
    )
    work_dir = Path(work_dir).resolve()
    for state in ("broker", "hub", "agents", "logs", "flower", "downloads"):
        shutil.rmtree(work_dir / state, ignore_errors=True)

    def say(msg: str) -> None:
        print(f"[p9] {msg}", flush=True)

    with ExitStack() as stack:
        s = start_loop_stack(work_dir, stack, regions, models_dir=models_dir, say=say, steps=4)
        data = load_task("elpv")
        phase_a, phase_b = split_phases(data, regions)
        idx_b = [i for i, _ in phase_b]
        y_b = data.labels[idx_b]
        say(f"phase A: {len(phase_a)} cases through the agents; phase B: {len(phase_b)} held out")
        results_a = stream(s.agent_urls, phase_a, data.images, desc="phase A")
        feedback = send_feedback(s.agent_urls, results_a, data.labels, share=feedback_share)
        cloud_b = cloud_predict(s.hub_url, s.admin, data, np.asarray(idx_b), s.bundle.manifest.input)

        fed = run_federation(s, regions, settings, say=say)
        result.measurements["federation"] = fed
        result.measurements["feedback"] = feedback
        result.measurements["phase_a_cases"] = len(phase_a)
        result.measurements["phase_a_escalation_rate"] = round(
            float(np.mean([r["escalated"] for r in results_a.values()])), 4)

        # Phase B on the old version, after the round (its cases can no longer reach training).
        old_live = stream(s.agent_urls, phase_b, data.images, desc="phase B, old")
        new_version = fed["new_version"]
        if new_version is None:
            result.measurements["live"] = compare_scores(live_scores(old_live, idx_b), None, cloud_b, y_b, s.threshold)
            result.notes.append(f"no new version: {fed['result'] or fed['status']}: {fed['reason']}")
        else:
            name = s.bundle.manifest.name
            assign_now(s.client, new_version, list(s.device_ids.values()), model_name=name,
                       reason="bench P9: deploy the federated version")
            wait_for_version(s.agent_urls, new_version)
            new_live = stream(s.agent_urls, phase_b, data.images, desc="phase B, new")
            result.measurements["live"] = compare_scores(live_scores(old_live, idx_b), live_scores(new_live, idx_b),
                                                         cloud_b, y_b, s.threshold)
            (work_dir / "downloads").mkdir(parents=True, exist_ok=True)
            from shared.bundle import unpack_bundle

            new_dir = unpack_bundle(s.client.download_artifact(name, new_version), work_dir / "downloads" / "new")
            result.measurements["offline"] = compare_versions(
                s.bundle.path / "model.onnx", new_dir / "model.onnx", data.images[idx_b], s.bundle.manifest.input,
                cloud_b, y_b, s.threshold)
        live = result.measurements["live"]
        result.measurements["per_region_phase_b"] = {
            region: int(sum(1 for _, r in phase_b if r == region)) for region in regions}
    result.targets.append(Target(
        "P9", "relative drop of the escalation rate needed for the old version's cascade accuracy on phase B",
        live.get("relative_drop"), P9_DROP, ">=",
        note=f"old {live.get('old_escalation_at_target')} -> new {live.get('new_escalation_at_target')} of "
             f"{live['cases']} cases for cascade accuracy {live['equal_accuracy_target']}"))
    result.notes.append(
        "the hub's gate and the round's val_accuracy use the task's test split as reference set, which contains "
        "phase A and phase B; training used only phase-A cases in the agents' learning stores")
    return result
