"""A small BatchNorm CNN for CPU-sized experiments (the offline demo's teacher).

``SmallCNN(widths=(32, 64, 128))``: conv3x3-BN-ReLU at 32x32 then max-pool (``stage1``, 16x16),
two conv3x3-BN-ReLU then max-pool (``stage2``, 8x8), one conv3x3-BN-ReLU (``stage3``, 8x8),
global average pooling and a linear classifier. About 20 M multiply-adds per 32x32 image with
the default widths, and it trains to a useful accuracy in a few epochs on a few thousand images.
Tap ``stage1`` / ``stage2`` / ``stage3`` with :class:`kdloss.FeatureTap` for features.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["SmallCNN"]


def _conv_bn(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """Three conv-BN stages, global average pooling, a linear classifier.

    Args:
        num_classes: output classes.
        widths: the channels of the three stages.
    """

    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int] = (32, 64, 128)) -> None:
        super().__init__()
        a, b, c = widths
        self.stage1 = nn.Sequential(*_conv_bn(3, a), nn.MaxPool2d(2))
        self.stage2 = nn.Sequential(*_conv_bn(a, b), *_conv_bn(b, b), nn.MaxPool2d(2))
        self.stage3 = nn.Sequential(*_conv_bn(b, c))
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stage3(self.stage2(self.stage1(x)))
        out: Tensor = self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))
        return out
