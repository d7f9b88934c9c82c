"""What the engine's tests share: tiny random image data, a CPU context, a small teacher, a hint run.

Every piece is small enough for a test to train a few epochs in a fraction of a second on one
CPU thread: 8x8 images of 3 classes, ``DeepNN`` / ``LightNN`` of the tutorial at width 2 to 4.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import kdloss
from reference_trainers.data import TensorAugment, TensorBatches, TensorSplit
from reference_trainers.engine import Context, RunData, RunSpec, TrainConfig
from reference_trainers.methods import HintStep, TeacherOutputs
from reference_trainers.models import DeepNN, LightNN

__all__ = ["MEAN", "STD", "cpu_context", "hint_spec", "tiny_data", "tiny_split", "tiny_teacher"]

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def tiny_split(n: int, seed: int) -> TensorSplit:
    """``n`` random uint8 images ``(3, 8, 8)`` with labels in ``{0, 1, 2}``, from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return TensorSplit(
        torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g), torch.randint(0, 3, (n,), generator=g)
    )


def tiny_data(*, augment: bool, n_train: int = 48, batch_size: int = 16, seed: int = 0) -> RunData:
    """A shuffled training split of ``n_train`` (crop + flip with ``augment``), 16 validation and 16 test images."""
    return RunData(
        train=TensorBatches(tiny_split(n_train, 1), batch_size, shuffle=True, seed=seed),
        val=TensorBatches(tiny_split(16, 2), 64),
        test=TensorBatches(tiny_split(16, 3), 64),
        train_augment=TensorAugment(MEAN, STD, crop_padding=2 if augment else 0, flip=augment),
        eval_augment=TensorAugment(MEAN, STD),
    )


def cpu_context(tmp: Path, **kw: object) -> Context:
    """A CPU context without progress bars writing to ``tmp``; ``kw`` are more ``TrainConfig`` fields."""
    return Context(TrainConfig(device="cpu", progress=False, out_dir=tmp, **kw), torch.device("cpu"))  # type: ignore[arg-type]


def tiny_teacher() -> nn.Module:
    """A ``DeepNN`` of width 4 for 8x8 images, the same weights every call."""
    torch.manual_seed(0)
    return DeepNN(3, (4, 4, 4, 4), image_size=8)


def hint_spec(teacher: nn.Module, epochs: int, *, resume: bool = False, method: str = "hint") -> RunSpec:
    """A hint + KD run (seed 5) of a ``LightNN`` of width 2 from ``teacher``'s ``features``: Adam, step decay."""
    return RunSpec(
        method,
        5,
        lambda: HintStep(
            LightNN(3, width=2, image_size=8),
            "features",
            kdloss.ConvAdapter(2, 4, 3),
            hint_weight=0.5,
            ce_weight=0.5,
            kd_weight=0.5,
            temperature=2.0,
        ),
        lambda p: torch.optim.Adam(p, lr=1e-2),
        epochs,
        scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 1, gamma=0.5),
        teacher=TeacherOutputs(teacher, {"features": "features"}),
        resume=resume,
    )
