"""``demo``: the README's offline demo (``make demo``), about a minute on an idle 2-core CPU.

On the embedded real CIFAR-10 subset (9,000 training images after a 1,000-image validation
split, 2,000 test images), a small BatchNorm CNN teacher (:class:`~reference_trainers.models.SmallCNN`, widths 24/48/96,
trained for 4 epochs on the 9,000 images with random flips) is distilled into the PyTorch KD
tutorial's LightNN student, which sees a class-balanced 2,000-image subset of the teacher's
training images (``--student-images``): the low-data setting in which soft targets carry the
most information (Hinton, Vinyals & Dean, 2015, section 3). Methods (``--methods``): plain
cross-entropy (``student-ce``), Hinton KD (``kd``: ``0.5 * KL_T^2 + 0.5 * CE``, T = 4), a
FitNets hint with a trainable 3x3 ``kdloss.ConvAdapter`` plus KD (``hint+kd``), and, when asked
for, attention transfer on two feature maps plus KD (``at+kd``, ``kdloss.AttentionLoss``,
beta = 1000). The students train for 12 epochs (batch 64) without augmentation, so the
teacher's outputs (logits and tapped features) are computed once per seed and shared by the
distillation runs. Every run uses Adam with a cosine learning-rate decay over its epochs. The
models run channels-last (faster on the CPU too). Prints the comparison table (real accuracies;
test accuracy of the epoch selected on the validation split) and writes
``runs/demo/results.{json,md,png}``. ``--data-root`` (``--dataset auto``) runs it on other
32x32 data.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from torch import nn

import kdloss
from reference_trainers.data import CIFAR10_MEAN, CIFAR10_STD, DataSplits, TensorSplit
from reference_trainers.engine import DistillStep, RunResult, RunSpec, TeacherCache, setup, teacher_cache, train_run
from reference_trainers.errors import TrainerError
from reference_trainers.methods import AttentionStep, CEStep, HintStep, KDStep, TeacherOutputs
from reference_trainers.models import LightNN, SmallCNN
from reference_trainers.recipes.common import (
    check_data_arguments,
    config_from_args,
    finish,
    load_splits,
    positive_float,
    positive_int,
    run_data,
    unit_float,
)

NAME = "demo"
HELP = "offline demo: distil a small teacher into a student on the embedded CIFAR-10 subset (CPU, minutes)"
TEACHER_WIDTHS = (24, 48, 96)
METHODS = ("student-ce", "kd", "hint+kd", "at+kd")
DEFAULT_METHODS = ("student-ce", "kd", "hint+kd")
EPOCHS = 12
TEACHER_EPOCHS = 4
STUDENT_IMAGES = 2000


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--teacher-epochs",
        type=positive_int,
        default=TEACHER_EPOCHS,
        help="teacher epochs (default: %(default)s; --smoke: --epochs)",
    )
    p.add_argument("--lr", type=positive_float, default=2e-3, help="Adam learning rate (default: %(default)s)")
    p.add_argument("--temperature", type=positive_float, default=4.0, help="KD temperature (default: %(default)s)")
    p.add_argument(
        "--kd-weight", type=unit_float, default=0.5, help="weight of the KD term, CE gets 1 - it (default: %(default)s)"
    )
    p.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"comma-separated subset of {','.join(METHODS)} (default: %(default)s)",
    )
    p.add_argument(
        "--student-images",
        type=positive_int,
        default=STUDENT_IMAGES,
        help="training images of the students, a class-balanced subset of the teacher's (default: %(default)s)",
    )
    p.add_argument(
        "--student-batch-size", type=positive_int, default=64, help="the students' batch size (default: %(default)s)"
    )
    p.set_defaults(epochs=EPOCHS, val_size=1000, dataset="auto")


def _methods(args: argparse.Namespace) -> list[str]:
    return [m.strip() for m in args.methods.split(",") if m.strip()]


def check(args: argparse.Namespace) -> None:
    """The demo's options, before anything runs (``--data-root`` is honoured: ``--dataset auto``)."""
    methods = _methods(args)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise TrainerError(f"unknown method(s) {unknown} in --methods; choose from {', '.join(METHODS)}")
    check_data_arguments(args, NAME)


def _channels_last(model: nn.Module) -> nn.Module:
    """The model's weights in channels-last: its convolutions then run channels-last on the CPU too,
    about 1.2x (teacher) to 1.4x (student) faster there (the engine does this on CUDA only)."""
    return model.to(memory_format=torch.channels_last)


def balanced_subset(labels: torch.Tensor, total: int, *, seed: int = 0) -> torch.Tensor:
    """Sorted indices of ``total`` samples, as equal a number per class as possible, drawn with a fixed
    generator (the same subset for every run and seed)."""
    classes = torch.unique(labels)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    per_class = {int(c): order[labels[order] == c] for c in classes}
    quota = [total // len(classes) + (1 if i < total % len(classes) else 0) for i in range(len(classes))]
    picked = [per_class[int(c)][:q] for c, q in zip(classes, quota)]
    return torch.cat(picked).sort().values


def _student_splits(splits: DataSplits, images: int | None) -> DataSplits:
    """The splits the students train on: the teacher's, with ``images`` training images (balanced)."""
    train = splits.train
    if images is None or not isinstance(train, TensorSplit) or images >= len(train):
        return splits
    sub = train.subset(balanced_subset(train.labels, images))
    desc = f"{len(sub):,} of the teacher's {len(train):,} training images (balanced over classes)"
    return DataSplits(train=sub, val=splits.val, test=splits.test, classes=splits.classes, description=desc)


def run(args: argparse.Namespace) -> int:
    methods = _methods(args)
    ctx = setup(config_from_args(args, NAME))
    splits = load_splits(args, ctx)
    n = splits.num_classes
    lr, epochs, T = args.lr, args.epochs, args.temperature
    kd_w, ce_w = args.kd_weight, 1.0 - args.kd_weight
    t_epochs = epochs if args.smoke else args.teacher_epochs
    student_splits = _student_splits(splits, args.student_images)
    ctx.log(f"students: {student_splits.description}")

    def adam(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=lr, fused=ctx.device.type == "cuda")

    def cosine(n_epochs: int) -> Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]:
        return lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=n_epochs)

    results: list[RunResult] = []
    for seed in args.seeds:
        teacher_data = run_data(
            ctx, splits, seed=seed, batch_size=args.batch_size, mean=CIFAR10_MEAN, std=CIFAR10_STD, flip=True
        )
        data = run_data(
            ctx, student_splits, seed=seed, batch_size=args.student_batch_size, mean=CIFAR10_MEAN, std=CIFAR10_STD
        )
        build_teacher = lambda: CEStep(_channels_last(SmallCNN(n, TEACHER_WIDTHS)))  # noqa: E731
        res = train_run(
            ctx,
            RunSpec("teacher", seed, build_teacher, adam, t_epochs, scheduler=cosine(t_epochs), resume=args.resume),
            teacher_data,
        )
        results.append(res)
        if res.step is None:
            raise RuntimeError("the teacher run returned no model")
        # one teacher side for every method: its outputs are computed once (no augmentation) and shared
        t_side = TeacherOutputs(res.step.student, {"features": "stage2", "at0": "stage1", "at1": "stage2"})
        cache = teacher_cache(ctx, t_side, data)

        def spec(
            method: str,
            build: Callable[[], DistillStep],
            s: int = seed,
            t: torch.nn.Module = t_side,
            c: TeacherCache | None = cache,
        ) -> RunSpec:
            return RunSpec(
                method,
                s,
                build,
                adam,
                epochs,
                cosine(epochs),
                teacher=t,
                teacher_cache=c,
                resume=args.resume,
            )

        builders: dict[str, Callable[[], DistillStep]] = {
            "student-ce": lambda: CEStep(_channels_last(LightNN(n))),
            "kd": lambda: KDStep(_channels_last(LightNN(n)), temperature=T, kd_weight=kd_w, ce_weight=ce_w),
            "hint+kd": lambda: HintStep(
                _channels_last(LightNN(n)),
                "features",
                kdloss.ConvAdapter(16, TEACHER_WIDTHS[1], kernel_size=3),
                hint_weight=0.25,
                ce_weight=ce_w,
                kd_weight=kd_w,
                temperature=T,
            ),
            "at+kd": lambda: AttentionStep(
                _channels_last(LightNN(n)),
                ["features.2", "features.5"],
                beta=1000.0,
                ce_weight=ce_w,
                kd_weight=kd_w,
                temperature=T,
            ),
        }
        for method in methods:
            results.append(train_run(ctx, spec(method, builders[method]), data))
    described = splits.description
    if student_splits is not splits:
        described += f"; students: {student_splits.description}"
    finish(ctx, args, NAME, results, {"data": described, "teacher": f"SmallCNN{TEACHER_WIDTHS}"})
    return 0
