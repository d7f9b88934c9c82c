"""The models of PyTorch's "Knowledge Distillation Tutorial" (pytorch.org tutorials).

``DeepNN`` (teacher, 1,186,986 parameters) and ``LightNN`` (student, 267,738 parameters), layer
for layer. Both have a ``features`` block (tap ``"features"`` with :class:`kdloss.FeatureTap`
for the hidden-representation phases: ``(N, 32, 8, 8)`` for the teacher, ``(N, 16, 8, 8)`` for
the student) and a ``classifier`` block on the flattened features. ``width`` scales the
convolution widths (1 = the tutorial's sizes; the offline demo uses smaller teachers).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["DeepNN", "LightNN", "count_parameters"]


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class DeepNN(nn.Module):
    """The tutorial's teacher: four 3x3 convolutions, two max-pools, a 2048-512-10 MLP.

    Args:
        num_classes: output classes (10 for CIFAR-10).
        widths: the four convolution widths (the tutorial's ``(128, 64, 64, 32)`` by default).
        image_size: input side (32 for CIFAR); the classifier sees ``widths[3] * (image_size // 4) ** 2``.
    """

    def __init__(
        self, num_classes: int = 10, widths: tuple[int, int, int, int] = (128, 64, 64, 32), image_size: int = 32
    ) -> None:
        super().__init__()
        a, b, c, d = widths
        self.features = nn.Sequential(
            nn.Conv2d(3, a, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(a, b, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(b, c, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c, d, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
        )
        flat = d * (image_size // 4) ** 2
        self.classifier = nn.Sequential(nn.Linear(flat, 512), nn.ReLU(), nn.Dropout(0.1), nn.Linear(512, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.classifier(torch.flatten(self.features(x), 1))
        return out


class LightNN(nn.Module):
    """The tutorial's student: two 3x3 convolutions with max-pools, a 1024-256-10 MLP.

    Args:
        num_classes: output classes.
        width: the convolution width (the tutorial's 16).
        image_size: input side (32 for CIFAR).
    """

    def __init__(self, num_classes: int = 10, width: int = 16, image_size: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(width, width, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
        )
        flat = width * (image_size // 4) ** 2
        self.classifier = nn.Sequential(nn.Linear(flat, 256), nn.ReLU(), nn.Dropout(0.1), nn.Linear(256, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.classifier(torch.flatten(self.features(x), 1))
        return out
