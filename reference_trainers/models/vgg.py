"""VGG with BatchNorm for 32x32 inputs, as in the community KD benchmark (CRD / RepDistiller).

The convolutions of VGG (Simonyan & Zisserman, ICLR 2015) without its fully connected layers:
five blocks of 3x3 conv-BN-ReLU layers (``block0`` ... ``block4``), max-pools ``pool0`` ...
``pool2`` between the first four blocks, global average pooling (``pool4``) and one
``Linear(512, num_classes)``. As in the benchmark, ``pool3`` is applied only to 64x64 inputs: at
32x32, ``block3`` and ``block4`` both run at 4x4. Configurations (channels per block):

- ``vgg8``  ``[64], [128], [256], [512], [512]``
- ``vgg11`` ``[64], [128], [256, 256], [512, 512], [512, 512]``
- ``vgg13`` ``[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]``
- ``vgg16`` and ``vgg19``: 3 and 4 convolutions in each of the last three blocks.

Convolutions carry a bias (as in the benchmark). Module names and indices follow the benchmark's
code (``block1.0`` conv, ``block1.1`` BN, ...) so its state dicts load; the difference is that
each block here ends with its (parameter-free, out-of-place) ReLU as a module, so the tapped
block output is the post-ReLU feature the benchmark distils from, and the pre-activation stays
readable at the block's last BN (``preact_paths``).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

__all__ = ["VGG", "VGG_CONFIGS", "vgg8", "vgg11", "vgg11_dih", "vgg13", "vgg16", "vgg19"]

VGG_CONFIGS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512)),
}


def _block(channels: Sequence[int], in_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, out_channels in enumerate(channels):
        last = i == len(channels) - 1
        layers += [
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=not last),  # the last one out of place: the block's BN output stays readable
        ]
        in_channels = out_channels
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """VGG-BN for 32x32 images (the community benchmark's variant).

    Args:
        config: five tuples of channels, one per block (see :data:`VGG_CONFIGS`).
        num_classes: outputs of the classifier.
        pool_every_block: the DIH paper's variant: a 2x2 max-pool after every block (``pool3``
            always, and ``pool4`` a global max-pool of the 2x2 map), as in the common
            ``[64, 'M', 128, 'M', ...]`` CIFAR VGG. Same parameters as the benchmark's.

    Shape:
        ``(B, 3, 32, 32) -> (B, num_classes)``; ``block0`` ... ``block4`` output 32x32, 16x16,
        8x8, 4x4, 4x4 maps (``pool3`` is skipped unless the input is 64x64).

    Raises:
        ValueError: if ``config`` does not have five non-empty blocks, or ``num_classes < 1``.

    Example:
        >>> import torch
        >>> net = VGG(VGG_CONFIGS["vgg8"], num_classes=10)
        >>> net(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, config: Sequence[Sequence[int]], num_classes: int, *, pool_every_block: bool = False) -> None:
        super().__init__()
        config = [tuple(b) for b in config]
        if len(config) != 5 or any(not b or min(b) < 1 for b in config):
            raise ValueError(f"config must list 5 non-empty blocks of positive channel counts, got {config}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.config = tuple(config)
        self.pool_every_block = pool_every_block
        ins = [3] + [b[-1] for b in config[:4]]
        self.block0 = _block(config[0], ins[0])
        self.block1 = _block(config[1], ins[1])
        self.block2 = _block(config[2], ins[2])
        self.block3 = _block(config[3], ins[3])
        self.block4 = _block(config[4], ins[4])
        in_channels = config[4][-1]
        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2)
        # DIH's VGG max-pools after every block (down to 1x1 at 32 px); the benchmark averages.
        self.pool4: nn.Module = nn.AdaptiveMaxPool2d(1) if pool_every_block else nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Linear(in_channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    @property
    def preact_paths(self) -> list[str]:
        """The last BatchNorm of ``block1`` ... ``block4``: the pre-ReLU stage features."""
        return [f"block{i}.{3 * len(self.config[i]) - 2}" for i in range(1, 5)]

    def forward(self, x: Tensor) -> Tensor:
        pool3 = self.pool_every_block or x.shape[-2] == 64
        x = self.pool0(self.block0(x))
        x = self.pool1(self.block1(x))
        x = self.pool2(self.block2(x))
        x = self.block3(x)
        if pool3:
            x = self.pool3(x)
        x = self.block4(x)
        out: Tensor = self.classifier(self.flatten(self.pool4(x)))
        return out

    def extra_repr(self) -> str:
        return f"config={self.config}, pool_every_block={self.pool_every_block}"


def vgg8(num_classes: int = 100) -> VGG:
    """vgg8 (the benchmark's ``vgg8_bn``, configuration "S"): one conv per block."""
    return VGG(VGG_CONFIGS["vgg8"], num_classes)


def vgg11(num_classes: int = 100) -> VGG:
    """vgg11 with BN (configuration "A")."""
    return VGG(VGG_CONFIGS["vgg11"], num_classes)


def vgg11_dih(num_classes: int = 100) -> VGG:
    """vgg11 with BN as in the DIH paper: max-pool after each of the five blocks (1x1 at the end)."""
    return VGG(VGG_CONFIGS["vgg11"], num_classes, pool_every_block=True)


def vgg13(num_classes: int = 100) -> VGG:
    """vgg13 with BN (configuration "B", the benchmark's teacher)."""
    return VGG(VGG_CONFIGS["vgg13"], num_classes)


def vgg16(num_classes: int = 100) -> VGG:
    """vgg16 with BN (configuration "D")."""
    return VGG(VGG_CONFIGS["vgg16"], num_classes)


def vgg19(num_classes: int = 100) -> VGG:
    """vgg19 with BN (configuration "E")."""
    return VGG(VGG_CONFIGS["vgg19"], num_classes)
