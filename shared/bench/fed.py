"""``edgefed bench fed --sections p6``: federated strategies vs centralized training on Fashion-MNIST.

Setup (one run, everything measured here): Fashion-MNIST's official train split is partitioned
over ``regions`` regions with Dirichlet(``alpha``) label skew (``shared.data.partition_dirichlet``);
each region's data go to its own SuperNode's data directory as an ``.npz``. The network is the edge
model (``EdgeCNN``, width 16, 28×28) from one random start. Every strategy runs on Flower's real
deployment engine (one SuperLink, one SuperNode per region, all on loopback) through
``federation.runner.FederationClient``; the global model is evaluated each round on the official
test split (the ``reference_data``). The centralized baseline trains the same network from the same
start with the same step (``federation.training.train_local``) on the union of the regions' data for
``rounds × local_epochs`` epochs and is evaluated after each epoch.

Measured: accuracy per round per strategy (JSON + PNG curve), rounds to reach 97 % of the
centralized accuracy (final epoch), and per round the orchestration overhead = round wall time
(ServerApp sends the round's messages → last reply in) minus the slowest client's reported local
training time; its median over rounds is the P6 overhead figure. ClientApp process start-up
(Flower starts one ``flwr-clientapp`` process per message) is part of that overhead and is reported
separately (``startup_s``).

Where a round's time goes (``overhead_breakdown``, from the ClientApps' reply metrics, see
``federation.client_app``): for the region whose reply was ready last (the round's critical path)
and per component, the median over rounds of ``dispatch`` (ServerApp creates the message → ClientApp
process starts: SuperNode's poll of the SuperLink, SuperExec's task poll, process launch),
``startup`` (process start → handler: Python, Flower's imports, pulling the message), ``import``
(torch and edgefed's training code), ``model`` (build + load global weights), ``data`` (the region's
data), ``compute`` (local training), ``pack`` (weights to Flower arrays) and ``reply`` (reply ready →
ServerApp has all replies: ClientApp → SuperNode → SuperLink → ServerApp's reply poll);
``unaccounted`` is the round wall time minus their sum. ``aggregate`` and ``server_eval`` (reference
set) follow the training phase and are reported next to it.
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from shared.bench.common import BenchResult, Target, summarize

__all__ = ["run_p6", "round_breakdown"]

_COMPONENTS = ("dispatch", "startup", "import", "model", "data", "compute", "pack")

log = logging.getLogger(__name__)


def _prepare(root: Path, limit: int | None, regions: int, alpha: float, seed: int) -> dict[str, Any]:
    from shared.data import load_task, partition_dirichlet, to_model_input

    ds = load_task("fmnist", limit=limit)
    train = np.flatnonzero(ds.types == "train")
    test = np.flatnonzero(ds.types == "test")
    x_all = to_model_input(ds.images, ds.input_spec)
    parts = partition_dirichlet(ds.labels[train], regions, alpha, seed=seed)
    region_dirs: dict[str, Path] = {}
    sizes: dict[str, int] = {}
    label_hist: dict[str, list[int]] = {}
    for i, part in enumerate(parts):
        name = f"r{i:02d}"
        idx = train[part]
        d = root / "regions" / name
        d.mkdir(parents=True, exist_ok=True)
        np.savez(d / "partition.npz", x=x_all[idx], y=ds.labels[idx])
        region_dirs[name] = d
        sizes[name] = len(idx)
        label_hist[name] = np.bincount(ds.labels[idx], minlength=ds.task.num_classes).tolist()
    np.savez(root / "reference.npz", x=x_all[test], y=ds.labels[test])
    return {
        "dataset": ds, "train": train, "test": test, "x": x_all, "region_dirs": region_dirs,
        "region_sizes": sizes, "region_label_hist": label_hist,
    }


def _initial_checkpoint(path: Path, ds: Any, width: int, seed: int) -> Path:
    import torch

    from shared.models import CheckpointMeta, build_model, save_checkpoint

    torch.manual_seed(seed)
    kwargs = {"in_channels": 1, "num_classes": ds.task.num_classes, "width": width}
    model = build_model("edge-cnn", **kwargs)
    meta = CheckpointMeta(name="fmnist-edge", version="0", role="edge", task="fmnist", arch="edge-cnn",
                          arch_kwargs=kwargs, labels=list(ds.task.labels), input=ds.input_spec)
    save_checkpoint(path, meta, model)
    return path


def _centralized(ckpt: Path, prep: dict[str, Any], epochs: int, lr: float, batch_size: int, seed: int,
                 threads: int) -> dict[str, Any]:
    import torch

    from federation.training import LocalData, evaluate, train_local
    from shared.models import load_checkpoint

    torch.set_num_threads(threads)
    ds, x = prep["dataset"], prep["x"]
    k = ds.task.num_classes
    train = LocalData.from_labels(x[prep["train"]], ds.labels[prep["train"]], k)
    test = LocalData.from_labels(x[prep["test"]], ds.labels[prep["test"]], k)
    model = load_checkpoint(ckpt).model
    curve, times = [], []
    for epoch in range(1, epochs + 1):
        m = train_local(model, train, epochs=1, lr=lr, batch_size=batch_size, seed=seed + epoch)
        times.append(m["compute-s"])
        curve.append(evaluate(model, test)["accuracy"])
        log.info("centralized epoch %d/%d: accuracy %.4f", epoch, epochs, curve[-1])
    return {"accuracy_per_epoch": curve, "final_accuracy": curve[-1], "best_accuracy": max(curve),
            "epoch_compute_s": summarize(times)}


def round_breakdown(entry: dict[str, Any]) -> dict[str, float] | None:
    """Where one round's training phase went, along its critical path (see the module docstring).

    ``entry`` is one round of ``result.json``; returns None for replies without the timing metrics.
    """
    regions = [v["train"] for v in entry.get("per_region", {}).values() if "train" in v]
    if not regions or any(r.get("done-at") is None or r.get("sent-at") is None for r in regions):
        return None
    wall = float(entry["round_wall_s"])
    end = min(float(r["sent-at"]) for r in regions) + wall
    last = max(regions, key=lambda r: float(r["done-at"]))
    out = {c: round(float(last.get(f"{c}-s") or 0.0), 4) for c in _COMPONENTS}
    out["reply"] = round(max(0.0, end - float(last["done-at"])), 4)
    out["unaccounted"] = round(wall - sum(out.values()), 4)
    out["round_wall"] = wall
    return out


def _breakdown_summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per component, the median (and max) over rounds of the critical path's share; plus server steps."""
    parts = [b for b in (round_breakdown(r) for r in rounds) if b is not None]
    out: dict[str, Any] = {}
    if parts:
        for key in parts[0]:
            vals = [b[key] for b in parts]
            out[key] = {"p50": round(float(np.median(vals)), 4), "max": round(float(max(vals)), 4)}
    for key in ("aggregate_s", "server_eval_s"):
        vals = [float(r[key]) for r in rounds if r.get(key) is not None]
        if vals:
            out[key.removesuffix("_s")] = {"p50": round(float(np.median(vals)), 4), "max": round(max(vals), 4)}
    # Every region, not just the critical one: how much each component costs a ClientApp.
    per_region = [v["train"] for r in rounds for v in r.get("per_region", {}).values() if "train" in v]
    out["all_regions"] = {c: summarize([float(v[f"{c}-s"]) for v in per_region if v.get(f"{c}-s") is not None])
                          for c in _COMPONENTS}
    return out


def _plot(path: Path, curves: dict[str, list[float]], centralized: list[float], local_epochs: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, acc in curves.items():
        ax.plot(range(1, len(acc) + 1), acc, marker="o", ms=3, label=name)
    # The centralized curve on the same axis: epoch e corresponds to round e / local_epochs.
    ax.plot([e / local_epochs for e in range(1, len(centralized) + 1)], centralized, "k--", label="centralized")
    ax.axhline(0.97 * centralized[-1], color="grey", lw=0.8, ls=":", label="97 % of centralized")
    ax.set_xlabel("round (centralized: epochs / local epochs)")
    ax.set_ylabel("test accuracy")
    ax.set_title("Fashion-MNIST, Dirichlet label skew: federated vs centralized")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_p6(
    *,
    rounds: int = 20,
    limit: int | None = None,
    strategies: tuple[str, ...] = ("fedavg", "fedprox", "fedadam"),
    regions: int = 10,
    alpha: float = 0.3,
    local_epochs: int = 1,
    lr: float = 1e-3,
    batch_size: int = 32,
    width: int = 16,
    seed: int = 0,
    client_eval: bool = False,
    proximal_mu: float = 0.01,
    fedadam_eta: float = 0.01,
    strategy_params: dict[str, dict[str, Any]] | None = None,
    run_timeout_s: float = 3600.0,
    plot_path: Path | None = None,
    work_dir: Path | None = None,
    task_poll_s: float | None = None,
    reply_poll_s: float | None = None,
    trainers: bool = True,
) -> BenchResult:
    """P6 as described in the module docstring; returns the result (the caller writes it)."""
    from federation.messaging import reply_poll_s as reply_poll_default
    from federation.processes import DEFAULT_TASK_POLL_S, FlowerDeployment
    from federation.runner import FederationClient, read_result
    from federation.spec import FedRunSpec

    params: dict[str, dict[str, Any]] = {"fedprox": {"proximal_mu": proximal_mu},
                                         "fedadam": {"eta": fedadam_eta, "eta_l": lr}}
    for name, given in (strategy_params or {}).items():  # the caller's override the defaults key by key
        params[name] = {**params.get(name, {}), **given}
    result = BenchResult(
        benchmark="fed-p6",
        settings={"rounds": rounds, "limit": limit, "strategies": list(strategies), "regions": regions,
                  "alpha": alpha, "local_epochs": local_epochs, "lr": lr, "batch_size": batch_size,
                  "network": f"edge-cnn width {width}, 28x28", "seed": seed, "client_eval": client_eval,
                  "strategy_params": {s: params.get(s, {}) for s in strategies},
                  "superexec_task_poll_s": task_poll_s if task_poll_s is not None else DEFAULT_TASK_POLL_S,
                  "serverapp_reply_poll_s": reply_poll_s if reply_poll_s is not None else reply_poll_default(),
                  "trainer_processes": trainers},
    )
    # SIGTERM must unwind like Ctrl-C, so that the deployment (SuperLink, SuperNodes) is stopped.
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    tmp = tempfile.TemporaryDirectory(prefix="edgefed-p6-") if work_dir is None else None
    root = Path(tmp.name) if tmp is not None else Path(work_dir)  # type: ignore[arg-type]
    try:
        t0 = time.perf_counter()
        prep = _prepare(root, limit, regions, alpha, seed)
        ckpt = _initial_checkpoint(root / "initial.pt", prep["dataset"], width, seed)
        result.measurements["data"] = {
            "train_items": len(prep["train"]), "test_items": len(prep["test"]),
            "region_sizes": prep["region_sizes"], "region_label_histograms": prep["region_label_hist"],
            "prepare_s": round(time.perf_counter() - t0, 2),
        }
        threads = max(1, min(4, os.cpu_count() or 1))
        central = _centralized(ckpt, prep, rounds * local_epochs, lr, batch_size, seed, threads)
        result.measurements["centralized"] = central
        curves: dict[str, list[float]] = {}
        per_strategy: dict[str, Any] = {}
        with FlowerDeployment(root / "deployment", prep["region_dirs"], task_poll_s=task_poll_s,
                              reply_poll_s=reply_poll_s, trainers=trainers) as dep:
            client = FederationClient(dep.address, dep.flwr_home)
            for name in strategies:
                spec = FedRunSpec(
                    model_name="fmnist-edge", kind="edge", task="fmnist", initial_checkpoint=ckpt,
                    output_dir=root / "runs" / name, strategy=name, strategy_params=params.get(name, {}),
                    rounds=rounds, local_epochs=local_epochs, lr=lr, batch_size=batch_size, soft_weight=0.0,
                    min_available=regions, min_fit=regions, round_timeout_s=max(300.0, run_timeout_s / rounds),
                    reference_data=root / "reference.npz", fraction_evaluate=1.0 if client_eval else 0.0,
                    seed=seed,
                )
                t1 = time.perf_counter()
                run_id = client.submit(spec)
                state = client.wait(run_id, run_timeout_s)
                res = read_result(spec.output_dir)
                if state.status != "finished":
                    per_strategy[name] = {"status": state.status, "reason": state.reason or res.reason}
                    result.notes.append(f"{name} failed: {state.reason or res.reason}")
                    continue
                acc = [float(r["val_accuracy"]) for r in res.rounds]
                curves[name] = acc
                overhead = [float(r["overhead_s"]) for r in res.rounds]
                startup = [max(float(v["train"].get("startup-s") or 0.0) for v in r["per_region"].values())
                           for r in res.rounds]
                setup = [max(float(v["train"].get("setup-s") or 0.0) for v in r["per_region"].values())
                         for r in res.rounds]
                target = 0.97 * central["final_accuracy"]
                reached = next((r["round"] for r in res.rounds if r["val_accuracy"] >= target), None)
                per_strategy[name] = {
                    "status": "finished", "run_id": run_id, "accuracy_per_round": acc, "final_accuracy": acc[-1],
                    "best_accuracy": max(acc), "rounds_to_97pct_of_centralized": reached,
                    "ratio_to_centralized": acc[-1] / central["final_accuracy"],
                    "round_wall_s": summarize([r["round_wall_s"] for r in res.rounds]),
                    "max_client_compute_s": summarize([r["max_client_compute_s"] for r in res.rounds]),
                    "overhead_s": summarize(overhead),
                    "clientapp_startup_s": summarize(startup),
                    "clientapp_setup_s": summarize(setup),
                    "overhead_breakdown": _breakdown_summary(res.rounds),
                    "rounds_breakdown": [round_breakdown(r) for r in res.rounds],
                    "run_wall_s": round(time.perf_counter() - t1, 2),
                }
                log.info("%s: final accuracy %.4f (centralized %.4f), overhead p50 %.2f s", name, acc[-1],
                         central["final_accuracy"], float(np.median(overhead)))
        result.measurements["strategies"] = per_strategy
        if plot_path is not None and curves:
            _plot(plot_path, curves, central["accuracy_per_epoch"], local_epochs)
            result.measurements["plot"] = str(plot_path)
        finished = {k: v for k, v in per_strategy.items() if v.get("status") == "finished"}
        best = max(finished.values(), key=lambda v: v["final_accuracy"], default=None)
        reached = [v["rounds_to_97pct_of_centralized"] for v in finished.values()
                   if v["rounds_to_97pct_of_centralized"] is not None]
        result.targets += [
            Target("P6", "best strategy: rounds to 97 % of centralized accuracy",
                   float(min(reached)) if reached else float("nan"), 20, "<=", "rounds",
                   note=f"within {rounds} rounds run"),
            Target("P6", "best strategy: final accuracy / centralized", best["ratio_to_centralized"] if best else None,
                   0.97, ">="),
            Target("P6", "orchestration overhead per round (median over rounds, worst strategy)",
                   max((v["overhead_s"]["p50"] for v in finished.values()), default=None), 1.0, "<=", "s"),
        ]
        result.notes.append(
            "overhead = round wall time minus the slowest client's local training time; it includes Flower "
            "starting one flwr-clientapp process per message (clientapp_startup_s: process start to handler; "
            "clientapp_setup_s: torch import, model and data loading), the polls of SuperNode (3 s, fixed in "
            "Flower 1.41), SuperExec and ServerApp, and the weights' transfer; overhead_breakdown splits the "
            "critical path of each round into these parts")
        if limit is not None:
            result.notes.append(f"smoke run on a {limit}-item slice; not a P6 measurement")
    finally:
        signal.signal(signal.SIGTERM, previous)
        if tmp is not None:
            tmp.cleanup()
    return result


def _raise_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")
