"""The reference networks: a small edge CNN and two cloud models (CloudCNN, the default, and CloudResNet).

The edge network uses only Conv/BatchNorm/ReLU/pooling/Linear so that static QDQ INT8
quantisation covers all of it (BatchNorm folds into Conv on export).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = ["DIHEDRAL_VIEWS", "TTA_VIEWS", "EdgeCNN", "CloudCNN", "CloudResNet", "dihedral", "dihedral_mean_probs"]

# The symmetries of a square: four rotations, each with and without a transpose.
DIHEDRAL_VIEWS = 8


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def dihedral(x: torch.Tensor, view: int) -> torch.Tensor:
    """View ``view`` (0..7) of N×C×H×W images: ``view % 4`` quarter turns, then a transpose if ``view >= 4``.

    Solar cells are square, so every view is a plausible picture of a cell; but their busbars run
    one way, so only the flips (``TTA_VIEWS["flips"]``) look like cells as a camera line sees them.
    """
    if not 0 <= view < DIHEDRAL_VIEWS:
        raise ValueError(f"dihedral view must be between 0 and {DIHEDRAL_VIEWS - 1}, got {view}")
    x = _QUARTER_TURNS[view % 4](x)
    return x.transpose(-2, -1) if view >= 4 else x


# torch.rot90(x, k, dims=(-2, -1)) written as flips and transposes (the same permutation of pixels),
# which every ONNX exporter handles: the hub runs cloud models in onnxruntime on a CPU.
_QUARTER_TURNS: tuple[Callable[[torch.Tensor], torch.Tensor], ...] = (
    lambda t: t,
    lambda t: t.flip(-1).transpose(-2, -1),
    lambda t: t.flip((-2, -1)),
    lambda t: t.transpose(-2, -1).flip(-1),
)


# TTA view sets: "flips" keeps the cell upright (identity, up-down, left-right, both), which suits
# ELPV cells whose busbars run one way; "dihedral" adds the quarter turns and transposes.
TTA_VIEWS: dict[str, tuple[int, ...]] = {"none": (0,), "flips": (0, 5, 7, 2), "dihedral": tuple(range(DIHEDRAL_VIEWS))}


def dihedral_mean_probs(
    net: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, views: Sequence[int] = TTA_VIEWS["dihedral"]
) -> torch.Tensor:
    """Log of ``net``'s softmax averaged over the given dihedral ``views`` of ``x`` (one batched pass).

    Returned as log-probabilities so that consumers applying softmax get the averaged
    probabilities back; when ``views`` is a group (``TTA_VIEWS``), the output does not change if
    ``x`` is replaced by any of those views of itself.
    """
    n = x.shape[0]
    batch = torch.cat([dihedral(x, v) for v in views])
    probs = torch.softmax(net(batch).float(), dim=1).view(len(views), n, -1).mean(0)
    return torch.log(probs.clamp_min(1e-12)).to(x.dtype)


class EdgeCNN(nn.Module):
    """Four conv blocks and a linear head; about 60k parameters at width 16."""

    def __init__(self, in_channels: int = 1, num_classes: int = 2, width: int = 16) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _conv_bn(in_channels, w),
            nn.MaxPool2d(2),
            _conv_bn(w, 2 * w),
            nn.MaxPool2d(2),
            _conv_bn(2 * w, 4 * w),
            nn.MaxPool2d(2),
            _conv_bn(4 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))


class CloudCNN(nn.Module):
    """EdgeCNN's trunk with a head that sees each channel's average and its strongest response.

    ELPV defects (cracks, dark inactive areas) often cover a few pixels of a 64x64 cell; the global
    average dilutes them and the global maximum keeps them. On ELPV at 64x64 this head was worth
    ~1.5 pt of validation accuracy over average pooling, while wider trunks (24-48) and the deeper
    CloudResNet were not more accurate. ``tta`` is as in ``CloudResNet``.
    """

    def __init__(
        self, in_channels: int = 1, num_classes: int = 2, width: int = 16, dropout: float = 0.0, tta: str = "none"
    ) -> None:
        super().__init__()
        if tta not in TTA_VIEWS:
            raise ValueError(f"tta must be one of {sorted(TTA_VIEWS)}, got {tta!r}")
        self.tta = tta
        w = width
        self.features = nn.Sequential(
            _conv_bn(in_channels, w),
            nn.MaxPool2d(2),
            _conv_bn(w, 2 * w),
            nn.MaxPool2d(2),
            _conv_bn(2 * w, 4 * w),
            nn.MaxPool2d(2),
            _conv_bn(4 * w, 4 * w),
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(8 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tta != "none" and not self.training:
            return dihedral_mean_probs(self._forward_once, x, TTA_VIEWS[self.tta])
        return self._forward_once(x)

    def _forward_once(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        pooled = torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], 1)
        return self.head(self.dropout(pooled))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CloudResNet(nn.Module):
    """A ResNet-style network with three stages of two basic blocks each.

    With ``tta`` ("flips" or "dihedral", see ``TTA_VIEWS``) the network answers, in eval mode, with
    the softmax averaged over those views of its input (``dihedral_mean_probs``), returned as
    log-probabilities: every consumer of the checkpoint (hub workers, REST predict, distillation)
    gets the steadier answer at 4x or 8x the compute, which the cloud side can afford. Training mode
    is unaffected.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        width: int = 32,
        dropout: float = 0.2,
        tta: str = "none",
        pool: str = "avg",
    ) -> None:
        super().__init__()
        if tta not in TTA_VIEWS:
            raise ValueError(f"tta must be one of {sorted(TTA_VIEWS)}, got {tta!r}")
        if pool not in ("avg", "avgmax"):
            raise ValueError(f"pool must be 'avg' or 'avgmax', got {pool!r}")
        self.tta = tta
        self.pool_mode = pool
        w = width
        self.stem = _conv_bn(in_channels, w)
        stages: list[nn.Module] = []
        cin = w
        for i, cout in enumerate((w, 2 * w, 4 * w)):
            stride = 1 if i == 0 else 2
            stages += [_BasicBlock(cin, cout, stride), _BasicBlock(cout, cout, 1)]
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(cin * (2 if pool == "avgmax" else 1), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tta != "none" and not self.training:
            return dihedral_mean_probs(self._forward_once, x, TTA_VIEWS[self.tta])
        return self._forward_once(x)

    def _forward_once(self, x: torch.Tensor) -> torch.Tensor:
        f = self.stages(self.stem(x))
        x = torch.flatten(self.pool(f), 1)
        if self.pool_mode == "avgmax":
            x = torch.cat([x, torch.amax(f, dim=(2, 3))], 1)
        return self.head(self.dropout(x))
