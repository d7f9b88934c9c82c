"""``tutorial-cifar10``: the five phases of PyTorch's "Knowledge Distillation Tutorial" (pytorch.org).

Per seed (``--seeds 42,0,1``): (1) ``teacher``: DeepNN with cross-entropy; then LightNN
students, each built right after ``torch.manual_seed(seed)`` so all start from the same weights:
(2) ``student-ce``; (3) ``kd``: ``0.25 * KL_T^2 + 0.75 * CE`` with T = 2 (``kdloss.KDLoss``,
batchmean, which is the tutorial's sum over classes divided by the batch); (4) ``cosine``:
``0.25 * (1 - cos)`` between the student's flattened features (1024) and the teacher's (2048)
average-pooled pairwise to 1024 (``kdloss.PoolAdapter(1024)``) ``+ 0.75 * CE``; (5)
``regressor``: a trainable ``ConvAdapter(16, 32, 3)`` on the student's ``(N, 16, 8, 8)`` map,
``0.25 * MSE`` to the teacher's ``(N, 32, 8, 8)`` map ``+ 0.75 * CE``. Adam(lr 1e-3), 10 epochs,
batch 128, no augmentation, ``ToTensor`` + ImageNet ``Normalize``. The teacher is trained once
per seed and reused by phases 3-5; its outputs are cached (the pipeline is deterministic).

Differences from the source, on purpose: a validation split (``--val-size``, default 5,000) is
held out of the training set to select the reported model (``--val-size 0`` trains on all
50,000 like the source and reports last-epoch test accuracy); the data are shuffled by a
generator seeded from the seed, not by the global RNG.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

import kdloss
from reference_trainers.data import IMAGENET_MEAN, IMAGENET_STD
from reference_trainers.engine import DistillStep, RunResult, RunSpec, setup, train_run
from reference_trainers.errors import TrainerError
from reference_trainers.methods import CEStep, CosineStep, HintStep, KDStep, TeacherOutputs
from reference_trainers.models import DeepNN, LightNN
from reference_trainers.recipes.common import (
    check_data_arguments,
    config_from_args,
    finish,
    load_splits,
    positive_float,
    run_data,
)

NAME = "tutorial-cifar10"
HELP = "the PyTorch KD tutorial's five phases, DeepNN -> LightNN on CIFAR-10"
PHASES = ("teacher", "student-ce", "kd", "cosine", "regressor")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--lr", type=positive_float, default=1e-3, help="Adam learning rate, all phases (default: %(default)s)"
    )
    p.add_argument("--temperature", type=positive_float, default=2.0, help="KD temperature (default: %(default)s)")
    p.add_argument(
        "--phases",
        default=",".join(PHASES),
        help="comma-separated subset of %(default)s (the teacher is trained when a later phase needs it; "
        "default: all of them)",
    )
    p.set_defaults(epochs=10, val_size=5000)


def _phases(args: argparse.Namespace) -> list[str]:
    return [x.strip() for x in args.phases.split(",") if x.strip()]


def check(args: argparse.Namespace) -> None:
    """The recipe's options, before anything runs: the phases and the data (the full CIFAR-10 unless
    ``--dataset embedded`` or ``--smoke``)."""
    phases = _phases(args)
    unknown = [x for x in phases if x not in PHASES]
    if unknown or not phases:
        raise TrainerError(f"unknown phase(s) {unknown} in --phases; choose from {', '.join(PHASES)}")
    check_data_arguments(args, NAME, full_data=True)


def _trained(teacher: torch.nn.Module | None) -> torch.nn.Module:
    """The teacher of the ``teacher`` phase, which runs whenever a distillation phase is asked for."""
    if teacher is None:
        raise RuntimeError("the teacher phase did not run")
    return teacher


def run(args: argparse.Namespace) -> int:
    phases = _phases(args)
    ctx = setup(config_from_args(args, NAME))
    splits = load_splits(args, ctx)
    n = splits.num_classes
    lr, epochs = args.lr, args.epochs

    def adam(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=lr, fused=ctx.device.type == "cuda")

    results: list[RunResult] = []
    for seed in args.seeds:
        data = run_data(ctx, splits, seed=seed, batch_size=args.batch_size, mean=IMAGENET_MEAN, std=IMAGENET_STD)

        def spec(
            method: str, build: Callable[[], DistillStep], teacher: torch.nn.Module | None = None, s: int = seed
        ) -> RunSpec:
            return RunSpec(method, s, build, adam, epochs, teacher=teacher, resume=args.resume)

        teacher: torch.nn.Module | None = None
        if {"teacher", "kd", "cosine", "regressor"} & set(phases):
            teacher_res = train_run(ctx, spec("teacher", lambda: CEStep(DeepNN(n))), data)
            if "teacher" in phases:
                results.append(teacher_res)
            if teacher_res.step is None:
                raise RuntimeError("the teacher run returned no model")
            teacher = teacher_res.step.student
        if "student-ce" in phases:
            results.append(train_run(ctx, spec("student-ce", lambda: CEStep(LightNN(n))), data))
        if "kd" in phases:
            build: Callable[[], DistillStep] = lambda: KDStep(  # noqa: E731
                LightNN(n), temperature=args.temperature, kd_weight=0.25, ce_weight=0.75
            )
            results.append(train_run(ctx, spec("kd", build, TeacherOutputs(_trained(teacher))), data))
        if "cosine" in phases:
            t_side = TeacherOutputs(_trained(teacher), {"features": "features"}, {"features": kdloss.PoolAdapter(1024)})
            build = lambda: CosineStep(LightNN(n), "features", hidden_weight=0.25, ce_weight=0.75)  # noqa: E731
            results.append(train_run(ctx, spec("cosine", build, t_side), data))
        if "regressor" in phases:
            t_side = TeacherOutputs(_trained(teacher), {"features": "features"})
            build = lambda: HintStep(  # noqa: E731
                LightNN(n), "features", kdloss.ConvAdapter(16, 32, kernel_size=3), hint_weight=0.25, ce_weight=0.75
            )
            results.append(train_run(ctx, spec("regressor", build, t_side), data))
    finish(ctx, args, NAME, results, {"data": splits.description, "phases": phases})
    return 0
