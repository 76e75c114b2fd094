"""Train the reference pair on CPU: the cloud model first, then the edge model distilled from it.

Both networks see exactly what the edge will see: images from ``shared.data`` at the task's
resolution, turned into tensors by ``shared.data.preprocess.to_model_input``. The edge model learns
from the cloud model's soft targets (temperature ``T``) as well as the labels, which reliably helps
a network this small; the teacher's logits are computed once per flip variant, so distillation
costs one teacher pass over the data instead of one per epoch.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from shared.data import Dataset, load_task, task_split, to_model_input
from shared.models import CheckpointMeta, build_model, save_checkpoint

__all__ = ["DEFAULT_EPOCHS", "TrainConfig", "TrainResult", "train_models", "predict_logits", "accuracy"]

log = logging.getLogger(__name__)

# Cloud epochs per task; the edge model trains EDGE_EPOCH_FACTOR times as many (it is ~10x cheaper).
DEFAULT_EPOCHS = {"elpv": 6, "elpv4": 6, "fmnist": 2}
EDGE_EPOCH_FACTOR = 3


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 5e-4
    temperature: float = 4.0
    distill_alpha: float = 0.5
    # ELPV is ~31% defective. "balanced" (1/frequency) weights cost ~1.5 pt of plain accuracy for
    # ~4 pt of balanced accuracy at 64x64 (measured); "sqrt" (1/sqrt(frequency)) sits in between.
    class_weighting: Literal["balanced", "sqrt", "none"] = "sqrt"
    # Width 16 keeps the cloud model trainable in minutes on 2 cores (width 32 was no more accurate
    # on ELPV at 64x64 and 4x slower). A wider edge model gains more from INT8 on VNNI CPUs.
    cloud_width: int = 16
    edge_width: int = 16
    threads: int | None = None

    def arch_kwargs(self, role: str) -> dict[str, Any]:
        if role == "cloud":
            return {"width": self.cloud_width, "dropout": 0.2}
        return {"width": self.edge_width}


@dataclass
class TrainResult:
    cloud_path: Path
    edge_path: Path
    metrics_path: Path
    metrics: dict[str, Any] = field(default_factory=dict)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits, axis=1) == labels)) if len(labels) else float("nan")


def balanced_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    pred = np.argmax(logits, axis=1)
    recalls = [np.mean(pred[labels == c] == c) for c in np.unique(labels)]
    return float(np.mean(recalls)) if recalls else float("nan")


def _class_weights(labels: np.ndarray, k: int, mode: str) -> torch.Tensor | None:
    """Loss weights against class imbalance, normalised so the average item weighs 1."""
    if mode == "none":
        return None
    freq = np.maximum(np.bincount(labels, minlength=k), 1) / len(labels)
    w = 1.0 / (freq if mode == "balanced" else np.sqrt(freq))
    w = w / np.sum(freq * w)
    return torch.tensor(w, dtype=torch.float32)


def _flip(x: torch.Tensor, variant: torch.Tensor) -> torch.Tensor:
    """Variant bit 0 flips left-right, bit 1 flips up-down (solar cells look alike both ways)."""
    x = x.clone()
    h = (variant & 1).bool()
    v = (variant & 2).bool()
    x[h] = x[h].flip(-1)
    x[v] = x[v].flip(-2)
    return x


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    model.eval()
    outs = [
        model(x[i : i + batch_size].contiguous(memory_format=torch.channels_last)) for i in range(0, len(x), batch_size)
    ]
    return torch.cat(outs).numpy() if outs else np.zeros((0, 0), np.float32)


def _fit(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    cfg: TrainConfig,
    class_weights: torch.Tensor | None,
    flips: bool,
    teacher: torch.Tensor | None,
    seed: int,
    progress: bool,
    desc: str,
) -> None:
    """Train ``model`` in place; ``teacher`` holds logits per flip variant, shape (4, N, K)."""
    rng = np.random.default_rng(seed)
    steps = max(1, -(-len(x) // cfg.batch_size))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=epochs * steps, pct_start=0.25)
    T, alpha = cfg.temperature, cfg.distill_alpha
    for epoch in range(epochs):
        model.train()
        order = torch.from_numpy(rng.permutation(len(x)))
        variants = torch.from_numpy(rng.integers(0, 4 if flips else 1, len(x)))
        bar = tqdm(range(steps), desc=f"{desc} epoch {epoch + 1}/{epochs}", disable=not progress, leave=False)
        total = 0.0
        for step in bar:
            idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            xb = _flip(x[idx], variants[idx]) if flips else x[idx]
            logits = model(xb.contiguous(memory_format=torch.channels_last))
            loss = F.cross_entropy(logits, y[idx], weight=class_weights)
            if teacher is not None:
                soft = F.softmax(teacher[variants[idx], idx] / T, dim=1)
                kd = F.kl_div(F.log_softmax(logits / T, dim=1), soft, reduction="batchmean") * T * T
                loss = alpha * kd + (1 - alpha) * loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach())
            bar.set_postfix(loss=f"{total / (step + 1):.3f}")
        log.debug("%s epoch %d/%d loss %.4f", desc, epoch + 1, epochs, total / steps)


def _teacher_logits(model: nn.Module, x: torch.Tensor, flips: bool) -> torch.Tensor:
    n_variants = 4 if flips else 1
    return torch.stack(
        [
            torch.from_numpy(predict_logits(model, _flip(x, torch.full((len(x),), v, dtype=torch.int64))))
            for v in range(n_variants)
        ]
    )


def train_models(
    task: str,
    out_dir: Path,
    epochs: int | None = None,
    resolution: tuple[int, int] | int | None = None,
    limit: int | None = None,
    seed: int = 0,
    progress: bool = True,
    *,
    version: str = "1",
    edge_epochs: int | None = None,
    cache_dir: Path | None = None,
    config: TrainConfig = TrainConfig(),
) -> TrainResult:
    """Train the cloud and the (distilled) edge model on the task's train split; write both checkpoints.

    Writes ``cloud.pt``, ``edge.pt`` and ``train_metrics.json`` into ``out_dir``. ``epochs`` is the
    cloud model's (default per task, ``DEFAULT_EPOCHS``); the edge model gets ``edge_epochs``
    (default ``EDGE_EPOCH_FACTOR × epochs``).
    """
    started = time.perf_counter()
    epochs = epochs if epochs is not None else DEFAULT_EPOCHS.get(task, 5)
    edge_epochs = edge_epochs if edge_epochs is not None else EDGE_EPOCH_FACTOR * epochs
    if epochs < 1 or edge_epochs < 1:
        raise ValueError(f"epochs must be at least 1, got cloud {epochs}, edge {edge_epochs}")
    out_dir = Path(out_dir)
    ds = load_task(task, resolution, cache_dir=cache_dir, limit=limit)
    split = task_split(ds, seed=seed)
    if len(split.train) == 0 or len(split.test) == 0:
        raise ValueError(f"{len(ds)} items are too few to split into train and test; raise --limit")
    threads_before = torch.get_num_threads()
    torch.set_num_threads(config.threads or max(1, min(os.cpu_count() or 1, 16)))
    torch.manual_seed(seed)
    try:
        models, metrics = _train_pair(ds, split.train, split.test, epochs, edge_epochs, seed, progress, config)
    finally:
        torch.set_num_threads(threads_before)
    spec = ds.input_spec
    k = ds.task.num_classes
    paths = {}
    for role, model, arch, kwargs in (
        ("cloud", models["cloud"], "cloud-resnet", config.arch_kwargs("cloud")),
        ("edge", models["edge"], "edge-cnn", config.arch_kwargs("edge")),
    ):
        meta = CheckpointMeta(
            name=f"{task}-{role}",
            version=version,
            role=role,
            task=task,
            arch=arch,
            arch_kwargs={"in_channels": spec.channels, "num_classes": k, **kwargs},
            labels=list(ds.task.labels),
            input=spec,
            metrics={
                "test_accuracy": metrics[role]["test_accuracy"],
                "test_balanced_accuracy": metrics[role]["test_balanced_accuracy"],
                "train_seconds": metrics[role]["train_seconds"],
            },
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        paths[role] = out_dir / f"{role}.pt"
        metrics[role]["sha256"] = save_checkpoint(paths[role], meta, model)
    metrics.update(
        task=task,
        resolution=list(ds.resolution),
        limit=limit,
        seed=seed,
        sizes={"train": len(split.train), "calibration": len(split.calibration), "test": len(split.test)},
        majority_baseline=float(np.bincount(ds.labels[split.test]).max() / len(split.test)),
        config=asdict(config),
        total_seconds=round(time.perf_counter() - started, 1),
    )
    metrics_path = out_dir / "train_metrics.json"
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    return TrainResult(paths["cloud"], paths["edge"], metrics_path, metrics)


def _train_pair(
    ds: Dataset,
    train_idx: np.ndarray,
    test_idx: np.ndarray,
    epochs: int,
    edge_epochs: int,
    seed: int,
    progress: bool,
    cfg: TrainConfig,
) -> tuple[dict[str, nn.Module], dict[str, Any]]:
    """Train the cloud model, then the edge model distilled from it; return both and their test metrics."""
    spec, k = ds.input_spec, ds.task.num_classes
    x_train = torch.from_numpy(to_model_input(ds.images[train_idx], spec))
    y_train = torch.from_numpy(ds.labels[train_idx])
    x_test = torch.from_numpy(to_model_input(ds.images[test_idx], spec))
    y_test = ds.labels[test_idx]
    is_elpv = ds.task.source == "elpv"
    weights = _class_weights(ds.labels[train_idx], k, cfg.class_weighting) if is_elpv else None
    results: dict[str, Any] = {}
    models: dict[str, nn.Module] = {}
    teacher_logits = None
    for role, arch, kwargs, n_epochs in (
        ("cloud", "cloud-resnet", cfg.arch_kwargs("cloud"), epochs),
        ("edge", "edge-cnn", cfg.arch_kwargs("edge"), edge_epochs),
    ):
        t0 = time.perf_counter()
        model = build_model(arch, in_channels=spec.channels, num_classes=k, **kwargs)
        model = model.to(memory_format=torch.channels_last)
        _fit(
            model,
            x_train,
            y_train,
            epochs=n_epochs,
            cfg=cfg,
            class_weights=weights,
            flips=is_elpv,
            teacher=teacher_logits,
            seed=seed + (0 if role == "cloud" else 1),
            progress=progress,
            desc=role,
        )
        if role == "cloud":
            teacher_logits = _teacher_logits(model, x_train, flips=is_elpv)
        logits = predict_logits(model, x_test)
        results[role] = {
            "arch": arch,
            "epochs": n_epochs,
            "test_accuracy": accuracy(logits, y_test),
            "test_balanced_accuracy": balanced_accuracy(logits, y_test),
            "train_seconds": round(time.perf_counter() - t0, 1),
        }
        models[role] = model.to(memory_format=torch.contiguous_format).eval()
        log.info(
            "%s model: test accuracy %.4f (%s epochs, %.0f s)",
            role,
            results[role]["test_accuracy"],
            n_epochs,
            results[role]["train_seconds"],
        )
    return models, results
