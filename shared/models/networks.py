"""The two reference networks: a small edge CNN and a ResNet-style cloud model.

The edge network uses only Conv/BatchNorm/ReLU/pooling/Linear so that static QDQ INT8
quantisation covers all of it (BatchNorm folds into Conv on export).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["DIHEDRAL_VIEWS", "EdgeCNN", "CloudResNet", "dihedral", "dihedral_mean_probs"]

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

    Solar cells are square and have no preferred orientation, so these eight views are equally
    valid pictures of the same cell.
    """
    if not 0 <= view < DIHEDRAL_VIEWS:
        raise ValueError(f"dihedral view must be between 0 and {DIHEDRAL_VIEWS - 1}, got {view}")
    x = torch.rot90(x, view % 4, dims=(-2, -1))
    return x.transpose(-2, -1) if view >= 4 else x


def dihedral_mean_probs(net: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Log of ``net``'s softmax averaged over the eight dihedral views of ``x`` (one batched pass).

    Returned as log-probabilities so that consumers applying softmax get the averaged
    probabilities back, and the output does not change when ``x`` is rotated or flipped.
    """
    n = x.shape[0]
    views = torch.cat([dihedral(x, v) for v in range(DIHEDRAL_VIEWS)])
    probs = torch.softmax(net(views).float(), dim=1).view(DIHEDRAL_VIEWS, n, -1).mean(0)
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

    With ``tta`` the network answers, in eval mode, with the softmax averaged over the eight
    dihedral views of its input (``dihedral_mean_probs``), returned as log-probabilities: every
    consumer of the checkpoint (hub workers, REST predict, distillation) gets the more accurate
    answer at 8x the compute, which the cloud side can afford. Training mode is unaffected.
    """

    def __init__(
        self, in_channels: int = 1, num_classes: int = 2, width: int = 32, dropout: float = 0.2, tta: bool = False
    ) -> None:
        super().__init__()
        self.tta = tta
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
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tta and not self.training:
            return dihedral_mean_probs(self._forward_once, x)
        return self._forward_once(x)

    def _forward_once(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.stages(self.stem(x)))
        return self.head(self.dropout(torch.flatten(x, 1)))
