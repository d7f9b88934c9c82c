"""ResNets for 32x32 inputs: the community benchmark's CIFAR ResNets and the 4-stage ResNet-18/34.

Two families share one class, :class:`CifarResNet` (post-activation ``BasicBlock`` s, a 3x3
stride-1 stem, no max-pool, global average pooling, one linear classifier):

- The **community benchmark** ResNets of CRD / RepDistiller (Tian et al., "Contrastive
  Representation Distillation", ICLR 2020): three stages, depth ``6n + 2`` with ``n`` blocks per
  stage. ``resnet8 ... resnet110`` use a 16-channel stem and stages of 16, 32, 64 channels; the
  ``x4`` variants use a 32-channel stem and stages of 64, 128, 256 channels (the stem is 2x,
  not 4x, wider, as in the benchmark's code). A shortcut is a 1x1 convolution + BatchNorm
  whenever the stride or the width changes (option B).
- The **4-stage ResNet-18/34** used for CIFAR by the DIH paper (Asadian et al., "Distilling
  Knowledge via Intermediate Classifiers", 2021) and most CIFAR KD work: a 64-channel stem and
  stages of 64, 128, 256, 512 channels with (2, 2, 2, 2) or (3, 4, 6, 3) blocks.

Module names follow the benchmark's code (``conv1, bn1, layer1.0.conv1, layer1.0.downsample.0,
fc``), so its published state dicts load with ``load_state_dict`` (our parameter-free
``avgpool``, ``flatten`` and ``preact`` add no keys). The stage outputs (``layer1`` ...
``layerK``) are post-ReLU tensors that no later module overwrites in place, so
:class:`kdloss.FeatureTap` captures them safely; ``flatten`` gives the ``(B, C)`` penultimate
feature, and each block's ``preact`` (an ``nn.Identity``) its pre-ReLU sum
(:attr:`CifarResNet.preact_paths`: the last block's of each stage, for activation boundaries).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "BasicBlock",
    "CifarResNet",
    "resnet8",
    "resnet8x4",
    "resnet14",
    "resnet18",
    "resnet20",
    "resnet32",
    "resnet32x4",
    "resnet34",
    "resnet44",
    "resnet56",
    "resnet110",
]


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity or 1x1 conv-BN shortcut, ReLU after the sum.

    .. math::

        y = \\mathrm{ReLU}\\big(\\mathrm{BN}(W_2 * \\mathrm{ReLU}(\\mathrm{BN}(W_1 * x))) + s(x)\\big)

    The sum before the last ReLU passes through ``preact`` (an ``nn.Identity``), so a
    :class:`kdloss.FeatureTap` on ``<block>.preact`` reads the pre-activation; that ReLU is out of
    place, so the tapped sum stays intact.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        stride: stride of the first convolution (and of the shortcut).

    Shape:
        ``(B, in_channels, H, W) -> (B, out_channels, H / stride, W / stride)``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.preact = nn.Identity()
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        # Out of place: the input x (a tapped stage output), bn2's output and the pre-activation
        # sum (tapped at `preact`) stay intact.
        result: Tensor = torch.relu(self.preact(out + shortcut))
        return result


class CifarResNet(nn.Module):
    """A post-activation ResNet for 32x32 images: 3x3 stem, ``len(blocks)`` stages, GAP, linear.

    Stage ``i`` (``layer{i+1}``) has ``blocks[i]`` :class:`BasicBlock` s of ``widths[i + 1]``
    channels; the first stage keeps the resolution, each later one halves it.

    Args:
        blocks: blocks per stage, e.g. ``(3, 3, 3)`` for resnet20.
        widths: the stem's channels followed by each stage's, e.g. ``(16, 16, 32, 64)``.
        num_classes: outputs of the classifier.

    Shape:
        ``(B, 3, H, W) -> (B, num_classes)``; stage ``i`` outputs
        ``(B, widths[i + 1], H / 2**i, W / 2**i)``.

    Raises:
        ValueError: if ``widths`` does not have one more entry than ``blocks``, or a count or
            width is not positive.

    Example:
        >>> import torch
        >>> net = CifarResNet(blocks=(1, 1, 1), widths=(16, 16, 32, 64), num_classes=10)
        >>> net(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, blocks: Sequence[int], widths: Sequence[int], num_classes: int) -> None:
        super().__init__()
        blocks, widths = list(blocks), list(widths)
        if len(widths) != len(blocks) + 1:
            raise ValueError(
                f"widths must list the stem's width and one per stage ({len(blocks) + 1} values for "
                f"{len(blocks)} stages), got {len(widths)}: {widths}"
            )
        if not blocks or min(blocks) < 1 or min(widths) < 1:
            raise ValueError(f"blocks and widths must be positive, got blocks={blocks}, widths={widths}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.blocks = tuple(blocks)
        self.widths = tuple(widths)
        self.conv1 = _conv3x3(3, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        in_channels = widths[0]
        for i, (n, width) in enumerate(zip(blocks, widths[1:])):
            stride = 1 if i == 0 else 2
            stage = [BasicBlock(in_channels, width, stride)] + [BasicBlock(width, width) for _ in range(n - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
            in_channels = width
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(in_channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def stage_names(self) -> list[str]:
        """``["layer1", ..., "layerK"]``."""
        return [f"layer{i + 1}" for i in range(len(self.blocks))]

    @property
    def preact_paths(self) -> list[str]:
        """The last block's ``preact`` of each stage: the pre-ReLU stage features (``layer1.<n-1>.preact``, ...)."""
        return [f"layer{i + 1}.{n - 1}.preact" for i, n in enumerate(self.blocks)]

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for name in self.stage_names:
            x = getattr(self, name)(x)
        out: Tensor = self.fc(self.flatten(self.avgpool(x)))
        return out

    def extra_repr(self) -> str:
        return f"blocks={self.blocks}, widths={self.widths}"


def _community(depth: int, widths: tuple[int, int, int, int], num_classes: int) -> CifarResNet:
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth must be 6n + 2 with n >= 1 (8, 14, 20, 32, 44, 56, 110), got {depth}")
    n = (depth - 2) // 6
    return CifarResNet((n, n, n), widths, num_classes)


_NARROW = (16, 16, 32, 64)
_WIDE = (32, 64, 128, 256)


def resnet8(num_classes: int = 100) -> CifarResNet:
    """resnet8 of the community benchmark: 1 block per stage, 16/32/64 channels."""
    return _community(8, _NARROW, num_classes)


def resnet14(num_classes: int = 100) -> CifarResNet:
    """resnet14 of the community benchmark: 2 blocks per stage, 16/32/64 channels."""
    return _community(14, _NARROW, num_classes)


def resnet20(num_classes: int = 100) -> CifarResNet:
    """resnet20 of the community benchmark: 3 blocks per stage, 16/32/64 channels."""
    return _community(20, _NARROW, num_classes)


def resnet32(num_classes: int = 100) -> CifarResNet:
    """resnet32 of the community benchmark: 5 blocks per stage, 16/32/64 channels."""
    return _community(32, _NARROW, num_classes)


def resnet44(num_classes: int = 100) -> CifarResNet:
    """resnet44 of the community benchmark: 7 blocks per stage, 16/32/64 channels."""
    return _community(44, _NARROW, num_classes)


def resnet56(num_classes: int = 100) -> CifarResNet:
    """resnet56 of the community benchmark: 9 blocks per stage, 16/32/64 channels."""
    return _community(56, _NARROW, num_classes)


def resnet110(num_classes: int = 100) -> CifarResNet:
    """resnet110 of the community benchmark: 18 blocks per stage, 16/32/64 channels."""
    return _community(110, _NARROW, num_classes)


def resnet8x4(num_classes: int = 100) -> CifarResNet:
    """resnet8x4 of the community benchmark: 32-channel stem, 1 block per stage, 64/128/256 channels."""
    return _community(8, _WIDE, num_classes)


def resnet32x4(num_classes: int = 100) -> CifarResNet:
    """resnet32x4 of the community benchmark: 32-channel stem, 5 blocks per stage, 64/128/256 channels."""
    return _community(32, _WIDE, num_classes)


def resnet18(num_classes: int = 100) -> CifarResNet:
    """ResNet-18 for CIFAR (DIH paper): 64-channel 3x3 stem, (2, 2, 2, 2) blocks of 64/128/256/512."""
    return CifarResNet((2, 2, 2, 2), (64, 64, 128, 256, 512), num_classes)


def resnet34(num_classes: int = 100) -> CifarResNet:
    """ResNet-34 for CIFAR (DIH paper): 64-channel 3x3 stem, (3, 4, 6, 3) blocks of 64/128/256/512."""
    return CifarResNet((3, 4, 6, 3), (64, 64, 128, 256, 512), num_classes)
