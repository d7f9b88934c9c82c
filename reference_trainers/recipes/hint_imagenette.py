"""``hint-imagenette``: FitNets-style hints (Romero et al., ICLR 2015), ResNet-50 -> ResNet-18 on Imagenette.

Data: an Imagenette tree (``--data-root`` with ``train/`` and ``val/`` ImageFolders, e.g.
``imagenette2-320``), read by a multi-worker DataLoader (``--workers``, default 4; ``--decode``
says whether the workers decode the JPEGs or the device does, batch by batch: ``auto`` picks the
device on CUDA):
train ``RandomResizedCrop(224)`` + horizontal flip, val ``Resize(256)`` + ``CenterCrop(224)``,
ImageNet normalisation. ``--synthetic`` first writes a synthetic ImageFolder of Imagenette's
shape (9,469 / 3,925 JPEGs, 10 classes, shorter side 320 px) under ``<out>/synthetic`` and uses
it: for timing and smoke tests when the real set is absent (its accuracies mean nothing).

Models: torchvision ResNet-50 (teacher) and ResNet-18 (student), ImageNet weights from
``--imagenet-weights`` (a directory with torchvision's ``resnet50-*.pth`` / ``resnet18-*.pth``,
or torchvision's cache), ``fc`` replaced by ``Linear(in, 10)``. Without the weights the recipe
stops with a message saying where it looked, unless ``--random-init``.

Loss: ``kd_weight * KL_T^2 + (1 - kd_weight) * CE + beta * MSE`` between the student's ``layer3[1]``
(N, 256, 14, 14) and the teacher's ``layer3[5]`` (N, 1024, 14, 14); T = 3, ``--kd-weight`` (also
spelled ``--alpha``, the source's name) = ``--beta`` = 0.5;
SGD (lr 0.01, momentum 0.9), 5 epochs, batch 32.

``--faithful`` reproduces the source's mistakes: the teacher's new ``fc`` is never trained (its
logits are random, so the KL distils noise); the 1x1 ``Conv2d(1024, 256)`` sits on the teacher
side and is not trained (a fixed random projection); the model kept is simply the last one. The
default fixes them: the teacher is fine-tuned on the training set first (``--teacher-epochs``,
default 2), the regressor is a trainable 1x1 ``Conv2d(256, 1024)`` on the student side (in the
optimiser and the checkpoint), and the reported model is selected on a validation split carved
from ``train/`` (``--val-size``, default min(500, 10 %)), next to the last epoch's; ``val/``
(Imagenette's held-out set) is only the test set. ``--faithful`` reports the last epoch's model.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import kdloss
from reference_trainers.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    FolderBatches,
    TensorAugment,
    count_images,
    find_unreadable_images,
    split_indices,
)
from reference_trainers.engine import DistillStep, RunData, RunResult, RunSpec, setup, train_run
from reference_trainers.errors import DataError, TrainerError
from reference_trainers.methods import CEStep, HintStep, TeacherOutputs
from reference_trainers.models import build_model, find_torchvision_weights, load_torchvision_weights
from reference_trainers.recipes.common import (
    add_decode_argument,
    config_from_args,
    describe_default,
    existing_path,
    finish,
    nonnegative_float,
    positive_float,
    positive_int,
    unit_float,
)

NAME = "hint-imagenette"
HELP = "FitNets-style hint ResNet-50 -> ResNet-18 on Imagenette, --faithful or corrected"
IMAGENETTE_SHAPE = {"train": 9469, "val": 3925, "classes": 10, "short_side": 320}


def _synthetic_jpeg(split: str, i: int, classes: int, short_side: int, seed: int) -> bytes:
    """Image ``i`` of ``split``: a smooth random JPEG of class ``i % classes``, seeded by its own position."""
    from torchvision.io import encode_jpeg

    gen = torch.Generator().manual_seed(seed * 1_000_003 + (0 if split == "train" else 500_000) + i)
    c = i % classes
    long = short_side + int(torch.randint(0, short_side // 2 + 1, (1,), generator=gen))
    h, w = (short_side, long) if i % 2 else (long, short_side)
    small = torch.rand(1, 3, 6, 6, generator=gen) * 0.5 + torch.linspace(0, 0.5, classes)[c]
    img = torch.nn.functional.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    return bytes(encode_jpeg((img[0] * 255).clamp(0, 255).byte(), quality=85).numpy().tobytes())


def _write_synthetic(root: str, split: str, start: int, stop: int, classes: int, short_side: int, seed: int) -> None:
    torch.set_num_threads(1)
    for i in range(start, stop):
        path = Path(root) / split / f"class{i % classes:02d}" / f"{split}_{i:05d}.jpg"
        path.write_bytes(_synthetic_jpeg(split, i, classes, short_side, seed))


def make_synthetic_imagefolder(
    root: Path,
    *,
    n_train: int,
    n_val: int,
    classes: int = 10,
    short_side: int = 320,
    seed: int = 0,
    workers: int = 1,
) -> Path:
    """Write a synthetic ImageFolder (``root/train/<class>``, ``root/val/<class>``) of smooth random JPEGs.

    Each image's shorter side is ``short_side`` and its longer side up to 1.5x that, like
    Imagenette's 320-px release. Every image is seeded by its own position, so the tree is the
    same whatever ``workers`` (processes that write it in parallel). Existing trees with the same
    counts are reused.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    marker = root / f".complete-{n_train}-{n_val}-{classes}-{short_side}"
    if marker.is_file():
        return root
    jobs = []
    for split, n in (("train", n_train), ("val", n_val)):
        for c in range(min(classes, n)):
            (root / split / f"class{c:02d}").mkdir(parents=True, exist_ok=True)
        chunk = max(1, -(-n // (4 * workers)))
        jobs += [(str(root), split, a, min(n, a + chunk), classes, short_side, seed) for a in range(0, n, chunk)]
    if workers == 1:
        for job in jobs:
            _write_synthetic(*job)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for f in [pool.submit(_write_synthetic, *job) for job in jobs]:
                f.result()
    marker.write_text("ok\n")
    return root


def default_workers() -> int:
    """The DataLoader workers without ``--workers``: 4 (the source's), at most the usable cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cores))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--faithful", action="store_true", help="the source's behaviour, mistakes included")
    p.add_argument(
        "--synthetic", action="store_true", help="generate and use a synthetic Imagenette-shaped tree (no --data-root)"
    )
    p.add_argument(
        "--imagenet-weights", type=existing_path, default=None, help="directory of torchvision resnet weights"
    )
    p.add_argument(
        "--random-init",
        action="store_true",
        help="run without ImageNet weights (timing, smoke; random weights can diverge at the default --lr, "
        "then the run stops with a message: pass a smaller one)",
    )
    p.add_argument(
        "--teacher-epochs",
        type=positive_int,
        default=2,
        help="teacher fine-tuning epochs, corrected mode (default: %(default)s)",
    )
    p.add_argument("--image-size", type=positive_int, default=224, help="crop size (default: %(default)s)")
    p.add_argument("--lr", type=positive_float, default=0.01, help="SGD learning rate (default: %(default)s)")
    p.add_argument("--temperature", type=positive_float, default=3.0, help="T (default: %(default)s)")
    p.add_argument(
        "--kd-weight",
        "--alpha",
        dest="kd_weight",
        type=unit_float,
        default=0.5,
        help="KL weight (the source's alpha); CE gets 1 - it (default: %(default)s)",
    )
    p.add_argument("--beta", type=nonnegative_float, default=0.5, help="hint MSE weight (default: %(default)s)")
    add_decode_argument(p)
    p.set_defaults(epochs=5, batch_size=32, workers=default_workers(), dataset="imagefolder")
    describe_default(p, "--val-size", "images of train/ held out for validation (default: min(500, 10 %% of train/))")


def _weights_file(name: str, args: argparse.Namespace) -> Path | None:
    """The file ``--imagenet-weights`` names for ``name`` (a ``<arch>-*.pth`` in a directory), or None."""
    if args.imagenet_weights is None:
        return None
    where = Path(args.imagenet_weights)
    if where.is_dir():
        base = name.removeprefix("tv_")
        found = sorted(where.glob(f"{base}-*.pth"))
        if not found:
            raise TrainerError(f"--imagenet-weights {str(where)!r} holds no {base}-*.pth file (torchvision's name)")
        return found[0]
    return where


def check(args: argparse.Namespace) -> None:
    """The recipe's options, before anything runs: where the images come from (no option of the
    tensor data sets, which this DataLoader recipe does not use), the ImageNet weights, the
    validation size against the training images."""
    if args.dataset != "imagefolder":
        raise TrainerError(
            f"hint-imagenette reads an ImageFolder tree (--data-root or --synthetic); got --dataset {args.dataset}"
        )
    for flag, value in (
        ("--download", args.download),
        ("--train-subset", args.train_subset),
        ("--test-subset", args.test_subset),
    ):
        if value:
            raise TrainerError(f"hint-imagenette does not use {flag} (it reads the whole Imagenette tree)")
    if args.synthetic and args.data_root is not None:
        raise TrainerError("pass --data-root (a real tree) or --synthetic (a generated one), not both")
    if not args.synthetic:
        if args.data_root is None:
            raise DataError(
                "hint-imagenette needs --data-root (an Imagenette tree with train/ and val/) or --synthetic"
            )
        root = Path(args.data_root)
        for split in ("train", "val"):
            if not (root / split).is_dir():
                raise DataError(f"data root {str(root)!r} must contain {split}/ (Imagenette's layout)")
        bad = find_unreadable_images(root)  # the first bytes of every file: up front, not mid-epoch
        if bad:
            shown = "; ".join(f"{str(path)!r}: {why}" for path, why in bad[:3])
            more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
            raise DataError(
                f"{len(bad)} file(s) under {str(root)!r} are not readable images: {shown}{more}; remove or replace them"
            )
    if args.faithful and args.val_size is not None:
        raise TrainerError("--faithful keeps the source's last-epoch model: it takes no --val-size")
    if not args.random_init:
        for name in ("tv_resnet50", "tv_resnet18"):
            try:
                find_torchvision_weights(name, _weights_file(name, args))
            except FileNotFoundError as e:
                raise TrainerError(f"{e}. Pass --imagenet-weights DIR, or --random-init to run without them") from e
    if args.val_size is not None and not args.synthetic and not args.smoke:
        n = count_images(Path(args.data_root) / "train")
        if args.val_size >= n:
            raise TrainerError(f"--val-size {args.val_size} must be smaller than the {n:,} images of train/")


def _weights(model: nn.Module, name: str, args: argparse.Namespace, ctx: Any) -> None:
    if args.random_init:
        return
    try:
        load_torchvision_weights(model, name, _weights_file(name, args))
    except (FileNotFoundError, ValueError) as e:
        raise TrainerError(f"{e}. Pass --imagenet-weights DIR, or --random-init to run without them") from e
    ctx.log(f"{name}: ImageNet weights loaded")


def transforms(size: int) -> tuple[Any, Any]:
    """The recipe's (train, evaluation) per-image transforms at ``size`` pixels (uint8 tensors in and out)."""
    from torchvision.transforms import v2

    train = v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()])
    val = v2.Compose([v2.Resize(round(size * 256 / 224), antialias=True), v2.CenterCrop(size)])
    return train, val


class _FixedProjection(nn.Module):
    """The source's teacher-side 1x1 conv: random, frozen, never in the optimiser (``--faithful``)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size=1)
        self.conv.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.conv(x)
        return out


def run(args: argparse.Namespace) -> int:
    epochs = args.epochs
    ctx = setup(config_from_args(args, NAME))
    if args.synthetic:
        counts = (24, 12, 40) if args.smoke else (IMAGENETTE_SHAPE["train"], IMAGENETTE_SHAPE["val"], 320)
        root = make_synthetic_imagefolder(
            Path(ctx.config.out_dir) / "synthetic", n_train=counts[0], n_val=counts[1], short_side=counts[2]
        )
        ctx.log(f"synthetic Imagenette-shaped tree at {root}")
    else:
        root = Path(args.data_root)
    size = min(args.image_size, 32) if args.smoke else args.image_size
    train_tf, val_tf = transforms(size)
    val_src = FolderBatches(
        root / "val",
        ctx.config.eval_batch_size,
        ctx.device,
        transform=val_tf,
        num_workers=args.workers,
        decode=args.decode,
        rank=ctx.rank,
        world_size=ctx.world_size,
    )
    classes = val_src.classes
    ctx.log(f"ImageFolder decoding: {val_src.decode} (--decode {args.decode}, {args.workers} workers)")
    n = len(classes)
    norm = TensorAugment(IMAGENET_MEAN, IMAGENET_STD, channels_last=ctx.use_channels_last)

    # Corrected mode: model selection on a validation split of train/ (the source picked the best
    # epoch on training accuracy, and its by-reference copy kept the last one); faithful: none.
    n_train = len(FolderBatches(root / "train", 1, classes=classes).dataset)
    val_size = 0 if args.faithful else (args.val_size if args.val_size is not None else min(500, n_train // 10))
    if args.smoke and not args.faithful:
        val_size = min(max(val_size, 1), 4)
    try:
        train_idx, held_idx = split_indices(n_train, val_size)
    except ValueError as e:
        raise DataError(f"--val-size: {e}") from None
    held = None
    if val_size:
        held = FolderBatches(
            root / "train",
            ctx.config.eval_batch_size,
            ctx.device,
            transform=val_tf,
            num_workers=args.workers,
            decode=args.decode,
            classes=classes,
            indices=held_idx,
            rank=ctx.rank,
            world_size=ctx.world_size,
        )

    def data_for(seed: int) -> RunData:
        train = FolderBatches(
            root / "train",
            args.batch_size,
            ctx.device,
            shuffle=True,
            seed=seed,
            transform=train_tf,
            deterministic=False,
            num_workers=args.workers,
            decode=args.decode,
            classes=classes,
            indices=train_idx,
            rank=ctx.rank,
            world_size=ctx.world_size,
        )
        return RunData(train=train, val=held, test=val_src, train_augment=norm, eval_augment=norm)

    def sgd(params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=args.lr, momentum=0.9)

    results: list[RunResult] = []
    for seed in args.seeds:
        data = data_for(seed)
        torch.manual_seed(seed)
        teacher = build_model("tv_resnet50", n)
        _weights(teacher, "tv_resnet50", args, ctx)
        if not args.faithful:

            def build_teacher(t: nn.Module = teacher) -> DistillStep:
                return CEStep(t)

            res = train_run(
                ctx,
                RunSpec(
                    "teacher", seed, build_teacher, sgd, 1 if args.smoke else args.teacher_epochs, resume=args.resume
                ),
                data,
            )
            results.append(res)
            assert res.step is not None
            teacher = res.step.student
        teacher.eval()

        def student() -> nn.Module:
            s = build_model("tv_resnet18", n)
            _weights(s, "tv_resnet18", args, ctx)
            return s

        if args.faithful:
            torch.manual_seed(seed)
            t_side = TeacherOutputs(teacher, {"features": "layer3.5"}, {"features": _FixedProjection(1024, 256)})
            build = lambda: HintStep(  # noqa: E731
                student(),
                "layer3.1",
                nn.Identity(),
                hint_weight=args.beta,
                ce_weight=1 - args.kd_weight,
                kd_weight=args.kd_weight,
                temperature=args.temperature,
            )
        else:
            t_side = TeacherOutputs(teacher, {"features": "layer3.5"})
            build = lambda: HintStep(  # noqa: E731
                student(),
                "layer3.1",
                kdloss.ConvAdapter(256, 1024, 1),
                hint_weight=args.beta,
                ce_weight=1 - args.kd_weight,
                kd_weight=args.kd_weight,
                temperature=args.temperature,
            )
        name = "hint-faithful" if args.faithful else "hint"
        results.append(
            train_run(ctx, RunSpec(name, seed, build, sgd, epochs, teacher=t_side, resume=args.resume), data)
        )
    finish(
        ctx,
        args,
        NAME,
        results,
        {
            "data": f"ImageFolder {root} ({len(classes)} classes, {size} px crops)",
            "faithful": args.faithful,
            "synthetic": args.synthetic,
            "decode": val_src.decode,
        },
    )
    return 0
