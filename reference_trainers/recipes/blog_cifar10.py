"""``blog-cifar10``: a public KD tutorial blog's ResNet-50 -> ResNet-18 on CIFAR-10 (Hinton et al., 2015).

SGD (lr 0.01, momentum 0.9, weight decay 5e-4), cosine annealing over 10 epochs, batch 128;
random crop (4-pixel padding), horizontal flip, ``Normalize((0.4914, 0.4822, 0.4465), (0.2023,
0.1994, 0.2010))``. Models: torchvision's ResNet-50 (teacher) and ResNet-18 (student) adapted
to 32x32 images (``tv_resnet50_cifar``, ``tv_resnet18_cifar``: 3x3 stride-1 ``conv1``, no
max-pool); the teacher (and with ``--pretrained-student`` the student) starts from ImageNet
weights when available (``--imagenet-weights DIR`` or torchvision's cache; never downloaded;
without them from scratch, which the log says).

Methods (``--method``), each the trainers' method of :data:`reference_trainers.methods.METHODS`
named in brackets: ``student-ce`` (the baseline, ``ce``); ``kd``: ``0.1 * CE + 0.9 * KL_T^2``,
T = 3 (``kd``); ``feature``: ``CE + MSE(conv1x1(f_s), f_t)`` on ``layer4`` (a trainable 1x1 conv
on the student to the teacher's 2048 channels; ``hint-last``); ``at``: ``CE + 1000 * AT`` on
``layer1`` ... ``layer4`` (``at``); ``self-distill``: the student alone with early-exit
classifiers on ``layer1`` ... ``layer3``, each trained with ``0.1 * CE + 0.9 * KL_T^2`` from the
student's own final output (``self-distill``, ``kdloss.SelfDistillationLoss``). ``--kd-weight``
is the KL weight (0.9), the CE gets ``1 - kd_weight``. Then the teacher and the KD student are
exported with TorchScript and compared: parameters, file size, latency (batch 1, median of
``--latency-runs``), in ``deploy.json`` / ``deploy.md``.

The source's mistake, offered with ``--faithful``: its teacher is the ImageNet ResNet-50 with its
1000-way head, used on CIFAR-10 unchanged (so the student also has 1000 outputs and the KL
distils ImageNet class scores). By default the teacher gets a 10-way head and is fine-tuned on
CIFAR-10 first (``--teacher-epochs``, default 10).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from reference_trainers import models
from reference_trainers.engine import DistillStep, RunResult, RunSpec, atomic_write_bytes, setup, train_run
from reference_trainers.errors import TrainerError
from reference_trainers.methods import AttentionOptions, CEStep, HintOptions, MethodSetup, get_method
from reference_trainers.methods import SelfDistillStep as SelfDistillStep  # its home of earlier versions
from reference_trainers.models import build_model, load_torchvision_weights, num_parameters
from reference_trainers.recipes.common import (
    check_data_arguments,
    config_from_args,
    existing_path,
    finish,
    load_splits,
    nonnegative_float,
    positive_float,
    positive_int,
    run_data,
    unit_float,
)

NAME = "blog-cifar10"
HELP = "the KD blog's ResNet-50 -> ResNet-18 on CIFAR-10: KD, features, AT, self-distillation, export"
METHODS = ("student-ce", "kd", "feature", "at", "self-distill")
REGISTRY_NAMES = {"student-ce": "ce", "kd": "kd", "feature": "hint-last", "at": "at", "self-distill": "self-distill"}
"""The trainers' method behind each of this recipe's methods (:data:`reference_trainers.methods.METHODS`)."""
BLOG_MEAN = (0.4914, 0.4822, 0.4465)
BLOG_STD = (0.2023, 0.1994, 0.2010)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--faithful", action="store_true", help="the source's ImageNet-headed, not fine-tuned teacher")
    p.add_argument(
        "--method",
        "--methods",
        dest="methods",
        default=",".join(METHODS),
        help="comma-separated methods among %(default)s (default: all of them)",
    )
    p.add_argument(
        "--teacher", default="tv_resnet50_cifar", metavar="MODEL", help="teacher model (default: %(default)s)"
    )
    p.add_argument(
        "--student", default="tv_resnet18_cifar", metavar="MODEL", help="student model (default: %(default)s)"
    )
    p.add_argument(
        "--imagenet-weights", type=existing_path, default=None, help="directory or file of torchvision weights"
    )
    p.add_argument("--pretrained-student", action="store_true", help="start the student from ImageNet weights too")
    p.add_argument(
        "--teacher-epochs", type=positive_int, default=None, help="teacher fine-tuning epochs (default: --epochs)"
    )
    p.add_argument("--lr", type=positive_float, default=0.01, help="SGD learning rate (default: %(default)s)")
    p.add_argument("--temperature", type=positive_float, default=3.0, help="T (default: %(default)s)")
    p.add_argument(
        "--kd-weight", type=unit_float, default=0.9, help="KL weight; the CE gets 1 - it (default: %(default)s)"
    )
    # --alpha was this recipe's CE weight; in every recipe --alpha is now the KL weight, so an old
    # command line is refused with the translation (check) instead of silently flipping its weights.
    p.add_argument("--alpha", type=unit_float, default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--at-beta",
        type=nonnegative_float,
        default=AttentionOptions.beta,
        help="attention-transfer beta (default: %(default)s)",
    )
    p.add_argument(
        "--feature-weight",
        type=nonnegative_float,
        default=HintOptions.last_weight,
        help="weight of the feature MSE (default: %(default)s)",
    )
    p.add_argument(
        "--latency-runs", type=positive_int, default=50, help="timed batch-1 forwards per model (default: %(default)s)"
    )
    p.set_defaults(epochs=10, batch_size=128, val_size=5000)


def _methods(args: argparse.Namespace) -> list[str]:
    return [m.strip() for m in args.methods.split(",") if m.strip()]


def check(args: argparse.Namespace) -> None:
    """The recipe's options, before anything runs: methods, the data (the full CIFAR-10 unless
    ``--dataset embedded`` or ``--smoke``)."""
    if args.alpha is not None:
        raise TrainerError(
            f"blog-cifar10's --alpha was the CE weight (the KL got 1 - alpha); --alpha now means the KL weight in "
            f"every recipe, and this recipe spells it --kd-weight: pass --kd-weight {1 - args.alpha:g} for the same run"
        )
    methods = _methods(args)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise TrainerError(f"unknown method(s) {unknown} in --method; choose from {', '.join(METHODS)}")
    for option, name in (("--teacher", args.teacher), ("--student", args.student)):
        model = name.removesuffix("_cifar") if args.faithful else name
        if model not in models.MODEL_NAMES:
            raise TrainerError(
                f"{option} {model!r} is not a registered model; choose one of {', '.join(models.MODEL_NAMES)}"
            )
    check_data_arguments(args, NAME, full_data=True)


def _imagenet(model: nn.Module, name: str, where: Path | None, ctx: Any) -> bool:
    base = name.removesuffix("_cifar")
    path = None
    if where is not None:
        path = where if where.is_file() else None
        if where.is_dir():
            found = sorted(where.glob(f"{base.removeprefix('tv_')}-*.pth"))
            path = found[0] if found else None
        if path is None:
            raise TrainerError(f"--imagenet-weights {str(where)!r} holds no {base.removeprefix('tv_')}-*.pth file")
    try:
        load_torchvision_weights(model, name, path)
    except (FileNotFoundError, KeyError) as e:
        if ctx is not None:
            ctx.log(f"{name}: no ImageNet weights ({e}); starting from random weights")
        return False
    except ValueError as e:
        raise TrainerError(str(e)) from e
    if ctx is not None:
        ctx.log(f"{name}: ImageNet weights loaded")
    return True


def _latency_ms(model: nn.Module, x: Tensor, runs: int) -> float:
    with torch.no_grad():
        for _ in range(3):
            model(x)
        times = []
        for _ in range(runs):
            if x.is_cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(x)
            if x.is_cuda:
                torch.cuda.synchronize()
            times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def export_and_compare(
    models: dict[str, nn.Module], out_dir: Path, device: torch.device, runs: int
) -> list[dict[str, Any]]:
    """TorchScript-export each model (traced, eval mode) to ``<out>/<name>.torchscript.pt``; measure it."""
    rows = []
    x = torch.randn(1, 3, 32, 32, device=device)
    for name, model in models.items():
        model = model.to(device).eval()
        with torch.no_grad():
            scripted = torch.jit.trace(model, x)  # type: ignore[no-untyped-call]
        buf = io.BytesIO()
        torch.jit.save(scripted, buf)
        path = out_dir / f"{name}.torchscript.pt"
        atomic_write_bytes(path, buf.getvalue())
        rows.append(
            {
                "model": name,
                "parameters": num_parameters(model),
                "file_mb": len(buf.getvalue()) / 1e6,
                "latency_ms_batch1": _latency_ms(scripted, x, runs),
                "device": str(device),
                "file": str(path),
            }
        )
    return rows


def run(args: argparse.Namespace) -> int:
    methods = _methods(args)
    epochs = args.epochs
    t_epochs = args.teacher_epochs or epochs
    ctx = setup(config_from_args(args, NAME))
    splits = load_splits(args, ctx)
    n = splits.num_classes
    teacher_name = args.teacher.removesuffix("_cifar") if args.faithful else args.teacher
    student_name = args.student.removesuffix("_cifar") if args.faithful else args.student
    heads = 1000 if args.faithful else n  # the source: ImageNet's 1000-way heads on CIFAR-10
    kd_w = args.kd_weight

    def sgd(params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=5e-4)

    def cosine(e: int) -> Any:
        return lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=e)

    if args.pretrained_student:  # fail early (and once) on unusable weights
        _imagenet(build_model(student_name, heads), student_name, args.imagenet_weights, ctx)

    def student() -> nn.Module:
        model = build_model(student_name, heads)
        if args.pretrained_student:
            _imagenet(model, student_name, args.imagenet_weights, None)
        return model

    results: list[RunResult] = []
    for seed in args.seeds:
        data = run_data(
            ctx, splits, seed=seed, batch_size=args.batch_size, mean=BLOG_MEAN, std=BLOG_STD, crop_padding=4, flip=True
        )
        torch.manual_seed(seed)
        teacher = build_model(teacher_name, heads)
        pretrained = _imagenet(teacher, teacher_name, args.imagenet_weights, ctx)
        if not args.faithful:

            def build_teacher(t: nn.Module = teacher) -> DistillStep:
                return CEStep(t)

            res = train_run(
                ctx, RunSpec("teacher", seed, build_teacher, sgd, t_epochs, cosine(t_epochs), resume=args.resume), data
            )
            results.append(res)
            assert res.step is not None
            teacher = res.step.student
        elif not pretrained:
            ctx.log("--faithful without ImageNet weights: the teacher is random, as meaningless as the source's head")
        teacher.eval()

        def spec(method: str, build: Any, t_side: nn.Module | None, s: int = seed) -> RunSpec:
            return RunSpec(method, s, build, sgd, epochs, cosine(epochs), teacher=t_side, resume=args.resume)

        msetup = MethodSetup(
            student=student_name,
            teacher=teacher_name,
            teacher_model=teacher,
            num_classes=heads,
            temperature=args.temperature,
            ce_weight=1 - kd_w,
            kd_weight=kd_w,
            student_factory=student,
            steps_per_epoch=len(data.train),
            epochs=epochs,
            log=ctx.log,
            hint=HintOptions(last_weight=args.feature_weight),
            attention=AttentionOptions(beta=args.at_beta),
        )
        for method in methods:
            built = get_method(REGISTRY_NAMES[method]).make(msetup)
            results.append(train_run(ctx, spec(method, built.build, built.teacher), data))

    deploy: list[dict[str, Any]] = []
    if ctx.is_main:
        kd_res = next((r for r in reversed(results) if r.method == "kd"), None)
        last_student = kd_res or next((r for r in reversed(results) if r.method != "teacher"), None)
        exported = {"teacher": teacher}
        if last_student is not None and last_student.step is not None:
            exported[f"student-{last_student.method}"] = last_student.step.student
        out_dir = Path(ctx.config.out_dir)
        deploy = export_and_compare(exported, out_dir, ctx.device, 3 if args.smoke else args.latency_runs)
        md = "| model | parameters | TorchScript file (MB) | latency, batch 1 (ms) | device |\n|---|---|---|---|---|\n"
        for r in deploy:
            md += f"| {r['model']} | {r['parameters']:,} | {r['file_mb']:.1f} | {r['latency_ms_batch1']:.2f} "
            md += f"| {r['device']} |\n"
        atomic_write_bytes(out_dir / "deploy.json", (json.dumps(deploy, indent=2) + "\n").encode())
        atomic_write_bytes(out_dir / "deploy.md", md.encode())
        print(md, end="")
    finish(
        ctx,
        args,
        NAME,
        results,
        {
            "data": splits.description,
            "faithful": args.faithful,
            "teacher": teacher_name,
            "student": student_name,
            "heads": heads,
            "deploy": deploy,
        },
    )
    return 0
