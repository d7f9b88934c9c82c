"""``demo``: the README's offline demo (``make demo``), a few minutes on a 2-core CPU.

On the embedded real CIFAR-10 subset (9,000 training images after a 1,000-image validation
split, 2,000 test images), a small BatchNorm CNN teacher (:class:`~reference_trainers.models.SmallCNN`,
trained with random flips) is distilled into the tutorial's LightNN student four ways:
plain cross-entropy (``student-ce``), Hinton KD (``kd``: ``0.5 * KL_T^2 + 0.5 * CE``, T = 4), a
FitNets hint with a trainable 3x3 ``kdloss.ConvAdapter`` plus KD (``hint+kd``) and attention
transfer on two feature maps plus KD (``at+kd``, ``kdloss.AttentionLoss``, beta = 1000). The
students train without augmentation, so the teacher's outputs (logits and tapped features) are
computed once per seed and shared by the three distillation runs. Every run uses Adam with a
cosine learning-rate decay over its epochs. Prints the comparison table
(real accuracies; test accuracy of the epoch selected on the validation split) and writes
``runs/demo/results.{json,md,png}``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

import kdloss
from reference_trainers.data import CIFAR10_MEAN, CIFAR10_STD
from reference_trainers.engine import DistillStep, RunResult, RunSpec, TeacherCache, setup, teacher_cache, train_run
from reference_trainers.errors import TrainerError
from reference_trainers.methods import AttentionStep, CEStep, HintStep, KDStep, TeacherOutputs
from reference_trainers.models import LightNN, SmallCNN
from reference_trainers.recipes.common import config_from_args, finish, load_splits, run_data

NAME = "demo"
HELP = "offline demo: distil a small teacher into a student on the embedded CIFAR-10 subset (CPU, minutes)"
TEACHER_WIDTHS = (32, 64, 128)
METHODS = ("student-ce", "kd", "hint+kd", "at+kd")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher-epochs", type=int, default=None, help="teacher epochs (default 8; --smoke: --epochs)")
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate")
    p.add_argument("--temperature", type=float, default=4.0, help="KD temperature")
    p.add_argument("--kd-weight", type=float, default=0.5, help="weight of the KD term (CE gets 1 - it)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.set_defaults(epochs=8, teacher_epochs=8, dataset="embedded")


def run(args: argparse.Namespace) -> int:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise TrainerError(f"unknown method(s) {unknown} in --methods; choose from {', '.join(METHODS)}")
    ctx = setup(config_from_args(args, NAME))
    splits = load_splits(args, ctx, default_val=1000)
    n = splits.num_classes
    lr, epochs, T = args.lr, args.epochs, args.temperature
    if not 0.0 <= args.kd_weight <= 1.0:
        raise TrainerError(f"--kd-weight must be in [0, 1], got {args.kd_weight}")
    kd_w, ce_w = args.kd_weight, 1.0 - args.kd_weight
    t_epochs = epochs if args.smoke else args.teacher_epochs

    def adam(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=lr, fused=ctx.device.type == "cuda")

    def cosine(n_epochs: int) -> Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]:
        return lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=n_epochs)

    results: list[RunResult] = []
    for seed in args.seeds:
        teacher_data = run_data(
            ctx, splits, seed=seed, batch_size=args.batch_size, mean=CIFAR10_MEAN, std=CIFAR10_STD, flip=True
        )
        data = run_data(ctx, splits, seed=seed, batch_size=args.batch_size, mean=CIFAR10_MEAN, std=CIFAR10_STD)
        build_teacher = lambda: CEStep(SmallCNN(n, TEACHER_WIDTHS))  # noqa: E731
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
            "student-ce": lambda: CEStep(LightNN(n)),
            "kd": lambda: KDStep(LightNN(n), temperature=T, kd_weight=kd_w, ce_weight=ce_w),
            "hint+kd": lambda: HintStep(
                LightNN(n),
                "features",
                kdloss.ConvAdapter(16, TEACHER_WIDTHS[1], kernel_size=3),
                hint_weight=0.25,
                ce_weight=ce_w,
                kd_weight=kd_w,
                temperature=T,
            ),
            "at+kd": lambda: AttentionStep(
                LightNN(n), ["features.2", "features.5"], beta=1000.0, ce_weight=ce_w, kd_weight=kd_w, temperature=T
            ),
        }
        for method in methods:
            results.append(train_run(ctx, spec(method, builders[method]), data))
    finish(ctx, args, NAME, results, {"data": splits.description, "teacher": f"SmallCNN{TEACHER_WIDTHS}"})
    return 0
