"""Data sets of the reference trainers."""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

EMBEDDED_PATH = Path(__file__).parent / "assets" / "cifar10_subset.pt.gz"


@dataclass(frozen=True)
class TensorSplit:
    """Images as a ``(N, 3, H, W)`` uint8 tensor with ``(N,)`` int64 labels."""

    images: Tensor
    labels: Tensor


@dataclass(frozen=True)
class EmbeddedCIFAR10:
    """The embedded CIFAR-10 subset: 1,000 train and 200 test real images per class."""

    train: TensorSplit
    test: TensorSplit
    classes: list[str]


def _decode(blob: Tensor, offsets: Tensor) -> Tensor:
    from torchvision.io import decode_jpeg

    chunks = [blob[int(offsets[i]) : int(offsets[i + 1])] for i in range(len(offsets) - 1)]
    return torch.stack(decode_jpeg(chunks))


def load_embedded_cifar10(path: Path = EMBEDDED_PATH) -> EmbeddedCIFAR10:
    """Decode the embedded CIFAR-10 subset (no network; about a second on one core)."""
    with gzip.open(path, "rb") as f:
        obj = torch.load(f, weights_only=True)
    return EmbeddedCIFAR10(
        train=TensorSplit(_decode(obj["train_bytes"], obj["train_offsets"]), obj["train_labels"]),
        test=TensorSplit(_decode(obj["test_bytes"], obj["test_offsets"]), obj["test_labels"]),
        classes=list(obj["classes"]),
    )
