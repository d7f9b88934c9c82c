"""Wide residual networks for 32x32 inputs (Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016).

``WRN-d-k``: depth ``d = 6n + 4`` (``n`` pre-activation blocks per stage), widening factor ``k``;
a 16-channel 3x3 stem and three stages of ``16k, 32k, 64k`` channels (strides 1, 2, 2), then
BN-ReLU, global average pooling and a linear classifier. A block is
``BN-ReLU-conv3x3-BN-ReLU-conv3x3`` plus the input, or a 1x1 convolution (no BN) of the
activated input when the width or stride changes.

Module names follow the community benchmark's code (CRD / RepDistiller: ``conv1,
block1.layer.0.bn1, block1.layer.0.convShortcut, bn1, fc``) so its published state dicts load.
The stage outputs ``block1``, ``block2``, ``block3`` are the pre-activation sums the benchmark
distils from (its ``f1, f2, f3``); ``flatten`` gives the ``(B, 64k)`` penultimate feature.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["WideBasicBlock", "WideResNet", "wrn_16_1", "wrn_16_2", "wrn_28_2", "wrn_40_1", "wrn_40_2"]


class WideBasicBlock(nn.Module):
    """Pre-activation block ``BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3`` with a shortcut.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        stride: stride of the first convolution (and of the 1x1 shortcut).
        drop_rate: dropout probability between the two convolutions.

    Shape:
        ``(B, in_channels, H, W) -> (B, out_channels, H / stride, W / stride)``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_channels == out_channels and stride == 1
        self.convShortcut: nn.Conv2d | None = None
        if not self.equal_in_out:
            self.convShortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        act = self.relu1(self.bn1(x))  # bn1's output is new, so the in-place ReLU leaves x intact
        out = self.relu2(self.bn2(self.conv1(act)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        result: Tensor = out + shortcut
        return result


class _Stage(nn.Module):
    """``n`` blocks held as ``self.layer`` (the benchmark's ``NetworkBlock``, kept for its key names)."""

    def __init__(self, n: int, in_channels: int, out_channels: int, stride: int, drop_rate: float) -> None:
        super().__init__()
        blocks = [WideBasicBlock(in_channels, out_channels, stride, drop_rate)]
        blocks += [WideBasicBlock(out_channels, out_channels, 1, drop_rate) for _ in range(n - 1)]
        self.layer = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.layer(x)
        return out


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor`` for 32x32 images.

    Args:
        depth: ``6n + 4`` (16, 22, 28, 40, ...).
        widen_factor: the widening factor ``k``.
        num_classes: outputs of the classifier.
        drop_rate: dropout probability inside each block.

    Shape:
        ``(B, 3, H, W) -> (B, num_classes)``; ``block1/2/3`` output
        ``(B, 16k, H, W), (B, 32k, H/2, W/2), (B, 64k, H/4, W/4)``.

    Raises:
        ValueError: if ``depth`` is not ``6n + 4`` with ``n >= 1``, or ``widen_factor``,
            ``num_classes`` are not positive, or ``drop_rate`` is outside ``[0, 1)``.

    Example:
        >>> import torch
        >>> net = WideResNet(depth=16, widen_factor=1, num_classes=10)
        >>> net(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, depth: int, widen_factor: int, num_classes: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}")
        if widen_factor < 1:
            raise ValueError(f"widen_factor must be >= 1, got {widen_factor}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
        self.depth, self.widen_factor = depth, widen_factor
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = _Stage(n, widths[0], widths[1], 1, drop_rate)
        self.block2 = _Stage(n, widths[1], widths[2], 2, drop_rate)
        self.block3 = _Stage(n, widths[2], widths[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    @property
    def preact_paths(self) -> list[str]:
        """``["block1", "block2", "block3"]``: the stage outputs are the pre-activation sums (the blocks
        are pre-activation: each starts with BN-ReLU on a new tensor, leaving its input intact)."""
        return ["block1", "block2", "block3"]

    def forward(self, x: Tensor) -> Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.relu(self.bn1(x))
        out: Tensor = self.fc(self.flatten(self.avgpool(x)))
        return out

    def extra_repr(self) -> str:
        return f"depth={self.depth}, widen_factor={self.widen_factor}"


def wrn_16_1(num_classes: int = 100) -> WideResNet:
    """WRN-16-1: 2 blocks per stage, 16/32/64 channels."""
    return WideResNet(16, 1, num_classes)


def wrn_16_2(num_classes: int = 100) -> WideResNet:
    """WRN-16-2: 2 blocks per stage, 32/64/128 channels (the benchmark's student)."""
    return WideResNet(16, 2, num_classes)


def wrn_28_2(num_classes: int = 100) -> WideResNet:
    """WRN-28-2: 4 blocks per stage, 32/64/128 channels (a DIH teacher)."""
    return WideResNet(28, 2, num_classes)


def wrn_40_1(num_classes: int = 100) -> WideResNet:
    """WRN-40-1: 6 blocks per stage, 16/32/64 channels."""
    return WideResNet(40, 1, num_classes)


def wrn_40_2(num_classes: int = 100) -> WideResNet:
    """WRN-40-2: 6 blocks per stage, 32/64/128 channels (the benchmark's teacher)."""
    return WideResNet(40, 2, num_classes)
