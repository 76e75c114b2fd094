"""Train the reference pair on CPU: the cloud model first, then the edge model distilled from it.

Both networks see exactly what the edge will see: images from ``shared.data`` at the task's
resolution, turned into tensors by ``shared.data.preprocess.to_model_input``. The edge model learns
from the cloud model's soft targets (temperature ``T``) as well as the labels, which reliably helps
a network this small; the teacher's logits are computed once per flip variant (once in all when
the cloud model averages over flips itself), so distillation costs one teacher pass over the data
instead of one per epoch.

The recipe (``TrainConfig``) was chosen on a validation slice carved from the train split, never on
the test split: on ELPV at 64x64 the avg+max pooled ``cloud-cnn`` with flip augmentation and flip
test-time averaging was the best cloud model found; the other options stay available, off.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
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
from shared.models.networks import DIHEDRAL_VIEWS, TTA_VIEWS, dihedral

__all__ = ["DEFAULT_EPOCHS", "TrainConfig", "TrainResult", "train_models", "predict_logits", "accuracy"]

log = logging.getLogger(__name__)

# Epochs per task for the cloud model; the edge model trains EDGE_EPOCH_FACTOR times as many. The
# default cloud (CloudCNN) costs about what the edge costs per epoch, so both get the same count.
DEFAULT_EPOCHS = {"elpv": 18, "elpv4": 18, "fmnist": 6}
EDGE_EPOCH_FACTOR = 1

Views = Literal["dihedral", "flips", "none"]


@dataclass(frozen=True)
class TrainConfig:
    """Training recipe. The defaults were chosen on a validation slice of ELPV's train split."""

    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 5e-4
    temperature: float = 4.0
    distill_alpha: float = 0.5
    # ELPV is ~31% defective. "balanced" (1/frequency) weights cost ~1.5 pt of plain accuracy for
    # ~4 pt of balanced accuracy at 64x64 (measured); "sqrt" (1/sqrt(frequency)) sits in between.
    class_weighting: Literal["balanced", "sqrt", "none"] = "sqrt"
    # "cloud-cnn" (avg+max pooled head) beat "cloud-resnet" by ~1.5-2 pt on ELPV validation at
    # 64x64 and trains ~2.5x faster; widths 24-48 and more epochs did not help either network.
    cloud_arch: Literal["cloud-cnn", "cloud-resnet"] = "cloud-cnn"
    cloud_width: int = 16
    # At width 16 the edge CNN (0.25 ms FP32) is too small for INT8 to save time: fixed per-node costs
    # dominate. At 32 the INT8 model runs in ~0.45-0.56x of the FP32 time on a VNNI CPU (P1), at the
    # same accuracy, still well under 1 ms per case.
    edge_width: int = 32
    # Orientation augmentation and cloud test-time averaging, over the views of
    # ``shared.models.networks.TTA_VIEWS`` (ELPV only). Cells have busbars running one way, so the
    # quarter turns of "dihedral" show the network cells it never meets: it cost 1-2 pt, and
    # dihedral TTA on a flips-trained network up to 8 pt. Flip TTA gained ~0.5 pt.
    cloud_augment: Views = "flips"
    cloud_tta: Views = "flips"
    edge_augment: Views = "flips"
    # Options measured on ELPV validation without a gain beyond noise (±1 pt), off by default:
    # soft targets [1-p, p] from the annotators' defect probability, weight EMA, mixup, label
    # smoothing, random shift/rotation, brightness/contrast jitter, cosine schedule.
    cloud_soft_labels: bool = False
    cloud_ema: float = 0.0
    cloud_mixup: float = 0.0
    cloud_label_smoothing: float = 0.0
    cloud_shift: float = 0.0  # random translation, in pixels (reflected at the border)
    cloud_rotate: float = 0.0  # random rotation, in degrees
    jitter: float = 0.0
    schedule: Literal["onecycle", "cosine"] = "onecycle"
    device: str = "cpu"
    threads: int | None = None

    def arch(self, role: str) -> str:
        return self.cloud_arch if role == "cloud" else "edge-cnn"

    def arch_kwargs(self, role: str, symmetric: bool = True) -> dict[str, Any]:
        """Network arguments; ``symmetric`` says the task's images may be flipped (ELPV cells)."""
        if role == "cloud":
            kwargs: dict[str, Any] = {"width": self.cloud_width}
            if self.cloud_arch == "cloud-resnet":
                kwargs["dropout"] = 0.2
            if self.cloud_tta != "none" and symmetric:
                kwargs["tta"] = self.cloud_tta
            return kwargs
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


def _augment_views(x: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
    """Item i becomes its dihedral view ``views[i]`` (see ``shared.models.networks.dihedral``)."""
    out = x.clone()
    for v in torch.unique(views).tolist():
        if v:
            sel = views == v
            out[sel] = dihedral(x[sel], v)
    return out


def _jitter(x: torch.Tensor, amount: float, gen: torch.Generator) -> torch.Tensor:
    """Per-item contrast (×U(1±a)) and brightness (+U(±a), in normalised units): EL exposure varies."""
    n = (len(x), 1, 1, 1)
    contrast = 1 + amount * (2 * torch.rand(n, generator=gen) - 1)
    brightness = amount * (2 * torch.rand(n, generator=gen) - 1)
    return x * contrast.to(x.device) + brightness.to(x.device)


def _affine(x: torch.Tensor, shift: float, rotate: float, gen: torch.Generator) -> torch.Tensor:
    """Per-item random translation (±``shift`` px) and rotation (±``rotate`` degrees), reflected at the edges."""
    n, _, h, w = x.shape
    angle = torch.deg2rad(rotate * (2 * torch.rand(n, generator=gen) - 1))
    tx, ty = (shift * (2 * torch.rand(2, n, generator=gen) - 1)) * torch.tensor([[2 / w], [2 / h]])
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1).to(x)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    model.eval()
    device = next(model.parameters()).device
    outs = [
        model(x[i : i + batch_size].to(device).contiguous(memory_format=torch.channels_last)).cpu()
        for i in range(0, len(x), batch_size)
    ]
    return torch.cat(outs).numpy() if outs else np.zeros((0, 0), np.float32)


@dataclass(frozen=True)
class _FitPlan:
    """What one model's training does; ``teacher`` holds logits per dihedral view, shape (8, N, K)."""

    epochs: int
    views: tuple[int, ...]
    targets: torch.Tensor | None = None  # N×K soft targets; None trains on the hard labels
    teacher: torch.Tensor | None = None
    ema: float = 0.0
    mixup: float = 0.0
    label_smoothing: float = 0.0
    shift: float = 0.0
    rotate: float = 0.0


class _Ema:
    """Exponential moving average of weights and BatchNorm statistics; the average is what gets saved."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        self.steps = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.steps += 1
        # Warm-up: early weights are poor, so the average forgets them quickly at first.
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        for e, m in zip(self.model.state_dict().values(), model.state_dict().values(), strict=True):
            if e.dtype.is_floating_point:
                e.lerp_(m, 1 - d)
            else:
                e.copy_(m)


def _schedule(opt: torch.optim.Optimizer, cfg: TrainConfig, total: int) -> torch.optim.lr_scheduler.LRScheduler:
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=0.25)
    warm = max(1, total // 20)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: (t + 1) / warm if t < warm else 0.5 * (1 + math.cos(math.pi * (t - warm) / (total - warm)))
    )


def _fit(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    plan: _FitPlan,
    *,
    cfg: TrainConfig,
    class_weights: torch.Tensor | None,
    seed: int,
    progress: bool,
    desc: str,
) -> nn.Module:
    """Train ``model`` in place; return it, or its weight average when ``plan.ema`` is set."""
    if plan.mixup > 0 and plan.targets is None:
        raise ValueError("mixup needs per-item target distributions (plan.targets)")
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    steps = max(1, -(-len(x) // cfg.batch_size))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = _schedule(opt, cfg, plan.epochs * steps)
    ema = _Ema(model, plan.ema) if plan.ema > 0 else None
    weight = class_weights.to(device) if class_weights is not None else None
    view_table = torch.tensor(plan.views)
    T, alpha = cfg.temperature, cfg.distill_alpha
    for epoch in range(plan.epochs):
        model.train()
        order = torch.from_numpy(rng.permutation(len(x)))
        views = view_table[torch.from_numpy(rng.integers(0, len(plan.views), len(x)))]
        bar = tqdm(range(steps), desc=f"{desc} epoch {epoch + 1}/{plan.epochs}", disable=not progress, leave=False)
        total = 0.0
        for step in bar:
            idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            xb = _augment_views(x[idx], views[idx]) if len(plan.views) > 1 else x[idx]
            if plan.shift > 0 or plan.rotate > 0:
                xb = _affine(xb, plan.shift, plan.rotate, gen)
            if cfg.jitter > 0:
                xb = _jitter(xb, cfg.jitter, gen)
            target: torch.Tensor = plan.targets[idx] if plan.targets is not None else y[idx]
            if plan.mixup > 0:
                lam = float(rng.beta(plan.mixup, plan.mixup))
                perm = torch.from_numpy(rng.permutation(len(idx)))
                xb = lam * xb + (1 - lam) * xb[perm]
                target = lam * target + (1 - lam) * target[perm]
            logits = model(xb.to(device).contiguous(memory_format=torch.channels_last))
            loss = F.cross_entropy(logits, target.to(device), weight=weight, label_smoothing=plan.label_smoothing)
            if plan.teacher is not None:
                soft = F.softmax(plan.teacher[views[idx], idx].to(device) / T, dim=1)
                kd = F.kl_div(F.log_softmax(logits / T, dim=1), soft, reduction="batchmean") * T * T
                loss = alpha * kd + (1 - alpha) * loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if ema is not None:
                ema.update(model)
            total += float(loss.detach())
            bar.set_postfix(loss=f"{total / (step + 1):.3f}")
        log.debug("%s epoch %d/%d loss %.4f", desc, epoch + 1, plan.epochs, total / steps)
    return ema.model if ema is not None else model


def _teacher_logits(model: nn.Module, x: torch.Tensor, views: tuple[int, ...], invariant: bool) -> torch.Tensor:
    """The teacher's logits for every training view, shape (8, N, K); views not trained on stay zero.

    An ``invariant`` teacher (TTA over a group holding all ``views``) answers the same for every
    view, so one (TTA) pass serves all.
    """
    if invariant:
        return torch.from_numpy(predict_logits(model, x)).expand(DIHEDRAL_VIEWS, -1, -1)
    out: torch.Tensor | None = None
    for v in views:
        logits = torch.from_numpy(predict_logits(model, dihedral(x, v)))
        if out is None:
            out = torch.zeros((DIHEDRAL_VIEWS, *logits.shape), dtype=logits.dtype)
        out[v] = logits
    assert out is not None
    return out


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
    for role, model in models.items():
        arch, kwargs = config.arch(role), config.arch_kwargs(role, symmetric=ds.task.source == "elpv")
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
    device = torch.device(cfg.device)
    x_train = torch.from_numpy(to_model_input(ds.images[train_idx], spec))
    y_train = torch.from_numpy(ds.labels[train_idx])
    x_test = torch.from_numpy(to_model_input(ds.images[test_idx], spec))
    y_test = ds.labels[test_idx]
    is_elpv = ds.task.source == "elpv"
    weights = _class_weights(ds.labels[train_idx], k, cfg.class_weighting) if is_elpv else None
    cloud_targets = None
    if cfg.cloud_soft_labels and ds.soft_labels is not None:
        cloud_targets = torch.from_numpy(ds.soft_labels[train_idx]).float()
    elif cfg.cloud_mixup > 0:
        cloud_targets = F.one_hot(y_train, k).float()
    # Orientation augmentation only where the images have no preferred orientation (ELPV cells).
    cloud_views = TTA_VIEWS[cfg.cloud_augment if is_elpv else "none"]
    edge_views = TTA_VIEWS[cfg.edge_augment if is_elpv else "none"]
    plans = {
        "cloud": _FitPlan(
            epochs,
            cloud_views,
            targets=cloud_targets,
            ema=cfg.cloud_ema,
            mixup=cfg.cloud_mixup,
            label_smoothing=cfg.cloud_label_smoothing,
            shift=cfg.cloud_shift,
            rotate=cfg.cloud_rotate,
        ),
        "edge": _FitPlan(edge_epochs, edge_views),
    }
    results: dict[str, Any] = {}
    models: dict[str, nn.Module] = {}
    kwargs_cloud = cfg.arch_kwargs("cloud", symmetric=is_elpv)
    for role in ("cloud", "edge"):
        arch, kwargs = cfg.arch(role), cfg.arch_kwargs(role, symmetric=is_elpv)
        t0 = time.perf_counter()
        model = build_model(arch, in_channels=spec.channels, num_classes=k, **kwargs)
        model = model.to(device, memory_format=torch.channels_last)
        plan = plans[role]
        if role == "edge":
            # A TTA teacher answers the same for every view of its (group of) views.
            invariant = set(edge_views) <= set(TTA_VIEWS[kwargs_cloud.get("tta", "none")])
            plan = replace(plan, teacher=_teacher_logits(models["cloud"], x_train, edge_views, invariant))
        model = _fit(
            model,
            x_train,
            y_train,
            plan,
            cfg=cfg,
            class_weights=weights,
            seed=seed + (0 if role == "cloud" else 1),
            progress=progress,
            desc=role,
        )
        models[role] = model
        logits = predict_logits(model, x_test)
        results[role] = {
            "arch": arch,
            "epochs": plan.epochs,
            "test_accuracy": accuracy(logits, y_test),
            "test_balanced_accuracy": balanced_accuracy(logits, y_test),
            "train_seconds": round(time.perf_counter() - t0, 1),
        }
        log.info(
            "%s model: test accuracy %.4f (%s epochs, %.0f s)",
            role,
            results[role]["test_accuracy"],
            plan.epochs,
            results[role]["train_seconds"],
        )
    for role, model in models.items():
        models[role] = model.to("cpu", memory_format=torch.contiguous_format).eval()
    return models, results
