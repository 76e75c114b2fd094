"""The torch side of a federation run: weights as Flower arrays, local fine-tuning, evaluation.

Shared by the ClientApp (local training on a region's learning store), the ServerApp (evaluation of
the global model on the task's reference set) and the P6 benchmark (the centralized baseline uses
the very same training step).

Only floating-point state (weights and BatchNorm running statistics) travels: integer buffers
(``num_batches_tracked``) stay local, so that strategies and DP noise only ever touch floats.

The loss (issue 5, "learning from the cloud"): for each case,
``soft_weight * KL(cloud_probs || softmax(logits)) + (1 - soft_weight) * CE(logits, hard_label)``
where the hard label is the inspector's confirmed label, else the cloud's label. A case without
cloud probabilities trains on the hard label alone (weight 1); a case with neither a label nor
cloud probabilities is skipped. With ``soft_weight = 0`` only hard labels count.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LocalData",
    "cases_to_data",
    "state_to_arrays",
    "arrays_to_state",
    "load_arrays",
    "train_local",
    "evaluate",
]


@dataclass
class LocalData:
    """Model inputs with hard labels (-1 where unknown) and soft targets (NaN rows where unknown)."""

    x: torch.Tensor  # float32 N×C×H×W
    hard: torch.Tensor  # int64 N, -1 = no hard label
    soft: torch.Tensor  # float32 N×K, NaN rows = no cloud probabilities

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def labelled(self) -> torch.Tensor:
        """Indices of cases with a hard label (what evaluation can score)."""
        return torch.nonzero(self.hard >= 0).flatten()

    @classmethod
    def from_labels(cls, x: np.ndarray, y: np.ndarray, num_classes: int) -> LocalData:
        """Hard-labelled data only (reference sets, benchmark partitions)."""
        n = len(y)
        return cls(
            torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),
            torch.from_numpy(np.asarray(y, dtype=np.int64)),
            torch.full((n, num_classes), float("nan")),
        )


def _fit_input(x: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray | None:
    """A stored case's tensor as C×H×W for the model; resized (bilinear) if only H×W differ."""
    arr = np.asarray(x, dtype=np.float32)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3 or arr.shape[0] != shape[0]:
        return None
    if arr.shape[1:] != shape[1:]:
        t = F.interpolate(torch.from_numpy(arr)[None], size=shape[1:], mode="bilinear", align_corners=False)
        arr = t[0].numpy()
    return arr


def cases_to_data(cases: Iterable[Any], *, task: str, num_classes: int, input_chw: tuple[int, int, int]) -> tuple[
    LocalData, dict[str, int]
]:
    """Turn ``edge_agent.learning_store.LearnedCase`` rows into training data.

    Rules: only cases of ``task`` whose input has the model's channel count are used (other
    resolutions are resized); hard label = confirmed label, else cloud label; soft target = the
    cloud's probabilities when they have ``num_classes`` entries; a case with neither is skipped,
    as is a label outside ``0..num_classes-1``. Returns the data and counts of what was skipped.
    """
    xs: list[np.ndarray] = []
    hard: list[int] = []
    soft: list[np.ndarray] = []
    skipped = {"other_task": 0, "bad_input": 0, "no_target": 0, "bad_label": 0}
    nan_row = np.full(num_classes, np.nan, dtype=np.float32)
    for case in cases:
        if case.task != task:
            skipped["other_task"] += 1
            continue
        x = _fit_input(case.input, input_chw)
        if x is None:
            skipped["bad_input"] += 1
            continue
        label = case.confirmed_label if case.confirmed_label is not None else case.cloud_label
        probs = case.cloud_probabilities
        if probs is not None and (len(probs) != num_classes or not np.all(np.isfinite(probs))):
            probs = None
        if label is not None and not 0 <= int(label) < num_classes:
            skipped["bad_label"] += 1
            continue
        if label is None and probs is None:
            skipped["no_target"] += 1
            continue
        xs.append(x)
        hard.append(-1 if label is None else int(label))
        if probs is None:
            soft.append(nan_row)
        else:
            p = np.clip(np.asarray(probs, dtype=np.float32), 0.0, None)
            soft.append(p / max(float(p.sum()), 1e-12))
    if not xs:
        empty = torch.zeros((0, *input_chw))
        return LocalData(empty, torch.zeros(0, dtype=torch.int64), torch.zeros((0, num_classes))), skipped
    data = LocalData(
        torch.from_numpy(np.stack(xs)), torch.tensor(hard, dtype=torch.int64), torch.from_numpy(np.stack(soft))
    )
    return data, skipped


def state_to_arrays(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's floating-point state (weights, BatchNorm statistics) as numpy arrays, in order."""
    return {
        k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items() if v.dtype.is_floating_point
    }


def arrays_to_state(model: nn.Module, arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """A full state dict: the given float arrays over the model's own integer buffers.

    Raises ``ValueError`` naming the first missing or mis-shaped tensor. Running variances are kept
    positive (DP noise or an adaptive server optimiser can push them below zero).
    """
    state = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if not v.dtype.is_floating_point:
            out[k] = v
            continue
        if k not in arrays:
            raise ValueError(f"global model arrays lack tensor {k!r}")
        a = torch.from_numpy(np.asarray(arrays[k], dtype=np.float32).copy())
        if tuple(a.shape) != tuple(v.shape):
            raise ValueError(f"tensor {k!r} has shape {tuple(a.shape)}, the model expects {tuple(v.shape)}")
        if k.endswith("running_var"):
            a = a.clamp_min(1e-5)
        out[k] = a.to(v.dtype)
    return out


def load_arrays(model: nn.Module, arrays: dict[str, np.ndarray]) -> nn.Module:
    model.load_state_dict(arrays_to_state(model, arrays))
    return model


def _loss(logits: torch.Tensor, hard: torch.Tensor, soft: torch.Tensor, soft_weight: float) -> torch.Tensor:
    """Per-batch mean of the mixed soft/hard loss (see the module docstring)."""
    logp = F.log_softmax(logits, dim=1)
    has_soft = ~torch.isnan(soft[:, 0])
    has_hard = hard >= 0
    # Weights per case: soft part only where cloud probabilities exist, hard part where a label exists.
    w_soft = torch.where(has_soft, torch.full_like(logp[:, 0], soft_weight), torch.zeros_like(logp[:, 0]))
    w_hard = torch.where(has_hard, 1.0 - w_soft, torch.zeros_like(w_soft))
    w_soft = torch.where(has_hard, w_soft, has_soft.float())  # soft-only cases: all weight on the soft target
    soft_t = torch.nan_to_num(soft, nan=0.0)
    kl = (soft_t * (torch.log(soft_t.clamp_min(1e-12)) - logp)).sum(1)
    ce = F.nll_loss(logp, hard.clamp_min(0), reduction="none")
    return (w_soft * kl + w_hard * ce).mean()


class _Adam:
    """Plain Adam (Kingma & Ba), as ``torch.optim.Adam`` with default betas and no weight decay.

    Written out because every ``torch.optim`` optimizer imports ``torch._dynamo`` on its first step,
    which costs 1.5-5 s of CPU in each short-lived ClientApp process (one per Flower message).
    """

    def __init__(self, params: Iterable[torch.Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.lr, (self.b1, self.b2), self.eps = lr, betas, eps
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = 0

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        c1, c2 = 1 - self.b1**self.t, 1 - self.b2**self.t
        for p, m, v in zip(self.params, self.m, self.v, strict=True):
            if p.grad is None:
                continue
            m.mul_(self.b1).add_(p.grad, alpha=1 - self.b1)
            v.mul_(self.b2).addcmul_(p.grad, p.grad, value=1 - self.b2)
            p.addcdiv_(m, (v / c2).sqrt_().add_(self.eps), value=-self.lr / c1)


def train_local(
    model: nn.Module,
    data: LocalData,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    soft_weight: float = 0.5,
    proximal_mu: float = 0.0,
    seed: int = 0,
) -> dict[str, float]:
    """Fine-tune ``model`` in place (Adam); FedProx's proximal term when ``proximal_mu > 0``.

    Returns ``{"train-loss", "compute-s", "num-examples"}``.
    """
    if not 0.0 <= soft_weight <= 1.0:
        raise ValueError(f"soft_weight must be between 0 and 1, got {soft_weight}")
    t0 = time.perf_counter()
    n = len(data)
    gen = torch.Generator().manual_seed(seed)
    global_params = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else []
    opt = _Adam(model.parameters(), lr=lr)
    total, steps = 0.0, 0
    model.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            if len(idx) < 2 and n >= 2:  # BatchNorm cannot train on a single item
                continue
            loss = _loss(model(data.x[idx]), data.hard[idx], data.soft[idx], soft_weight)
            if proximal_mu > 0:
                prox = sum(((p - g) ** 2).sum() for p, g in zip(model.parameters(), global_params, strict=True))
                loss = loss + (proximal_mu / 2) * prox
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach())
            steps += 1
    model.eval()
    return {"train-loss": total / max(steps, 1), "compute-s": time.perf_counter() - t0, "num-examples": float(n)}


@torch.no_grad()
def evaluate(model: nn.Module, data: LocalData, batch_size: int = 512) -> dict[str, float]:
    """Accuracy and cross-entropy over the cases with a hard label; ``num-examples`` counts them."""
    model.eval()
    idx = data.labelled
    if len(idx) == 0:
        return {"accuracy": float("nan"), "loss": float("nan"), "num-examples": 0.0}
    correct, loss = 0, 0.0
    for i in range(0, len(idx), batch_size):
        sel = idx[i : i + batch_size]
        logits = model(data.x[sel])
        y = data.hard[sel]
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
    n = len(idx)
    return {"accuracy": correct / n, "loss": loss / n, "num-examples": float(n)}
