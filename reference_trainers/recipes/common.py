"""What every recipe shares: common CLI options, data set-up, the per-seed run data, the report.

- :func:`add_common_arguments` adds ``--out --seeds --epochs --batch-size --device --no-amp
  --no-channels-last --compile --no-teacher-cache --max-batches --smoke --resume
  --stop-after-epoch --stop-after-step --checkpoint-every --deterministic --threads --no-progress
  --dataset --data-root --download
  --val-size --workers --train-subset --test-subset`` (a recipe sets its own defaults with
  ``parser.set_defaults``); :func:`add_decode_argument` adds ``--decode`` for the recipes that
  read ImageFolder trees through ``FolderBatches``.
- :func:`config_from_args` -> :class:`~reference_trainers.engine.TrainConfig`.
- :func:`load_splits` loads the data (``--smoke`` shrinks it) and :func:`run_data` builds the
  :class:`~reference_trainers.engine.RunData` of one seed (tensor data on the device, sharded
  under DDP, shuffled by the seed).
- :func:`finish` writes ``results.json/.md/.png`` (rank 0) and prints the Markdown table.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch

from reference_trainers.data import DECODE_MODES, DataSplits, TensorAugment, TensorBatches, TensorSplit, load_dataset
from reference_trainers.engine import Context, RunData, RunResult, TrainConfig, environment, markdown_table, summarise
from reference_trainers.engine import write_reports as _write_reports

__all__ = [
    "add_common_arguments",
    "add_decode_argument",
    "config_from_args",
    "finish",
    "load_splits",
    "run_data",
    "storage_device",
]


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def _seeds(s: str) -> list[int]:
    try:
        seeds = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 42,0,1, got {s!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError(f"expected at least one seed, got {s!r}")
    return seeds


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """The options every recipe accepts."""
    g = p.add_argument_group("run")
    g.add_argument("--out", type=Path, default=None, help="output directory (default: runs/<recipe>)")
    g.add_argument("--seeds", type=_seeds, default=[42], help="comma-separated seeds, e.g. 42,0,1")
    g.add_argument("--epochs", type=_positive_int, default=None, help="epochs per phase (recipe default)")
    g.add_argument("--batch-size", type=_positive_int, default=128, help="batch size per process")
    g.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    g.add_argument("--stop-after-epoch", type=_positive_int, default=None, help=argparse.SUPPRESS)
    g.add_argument("--stop-after-step", type=_positive_int, default=None, help=argparse.SUPPRESS)
    g.add_argument(
        "--checkpoint-every",
        type=_positive_int,
        default=None,
        metavar="N",
        help="also checkpoint every N steps inside an epoch (default: epoch ends; Ctrl-C always writes one)",
    )
    g.add_argument("--smoke", action="store_true", help="a few batches of everything on a small subset")
    g.add_argument("--max-batches", type=_positive_int, default=None, help="cap on batches per epoch")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g = p.add_argument_group("speed")
    g.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    g.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    g.add_argument("--no-channels-last", action="store_true", help="no channels-last on CUDA")
    g.add_argument("--compile", action="store_true", help="torch.compile the student")
    g.add_argument("--no-teacher-cache", action="store_true", help="run the teacher on every batch")
    g.add_argument("--deterministic", action="store_true", help="deterministic algorithms (slower)")
    g.add_argument("--threads", type=_positive_int, default=None, help="CPU threads for torch (default: torch's)")
    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset",
        choices=["auto", "embedded", "cifar10", "cifar100", "imagefolder"],
        default="auto",
        help="auto: the embedded subset without --data-root, an ImageFolder when DATA_ROOT/train exists, "
        "else torchvision CIFAR-10",
    )
    g.add_argument("--data-root", type=Path, default=None, help="data directory")
    g.add_argument("--download", action="store_true", help="let torchvision download CIFAR (needs network)")
    g.add_argument("--val-size", type=int, default=None, help="training images held out for validation")
    g.add_argument("--workers", type=int, default=0, help="decoding processes for ImageFolder data")
    g.add_argument("--train-subset", type=_positive_int, default=None, help="train on this many images only")
    g.add_argument("--test-subset", type=_positive_int, default=None, help="test on this many images only")


def add_decode_argument(p: argparse.ArgumentParser) -> None:
    """``--decode auto|cpu|device``, for the recipes that read ImageFolder trees through
    :class:`~reference_trainers.data.FolderBatches` (passed on as its ``decode``)."""
    p.add_argument(
        "--decode",
        choices=DECODE_MODES,
        default="auto",
        help="where ImageFolder images are decoded: cpu (in the --workers processes, transforms there too), "
        "device (the workers only read the files; each batch's JPEGs are decoded in one call on the device, "
        "nvJPEG on CUDA, and the transforms run there), auto (device on CUDA, else cpu; the default)",
    )


def config_from_args(args: argparse.Namespace, recipe: str) -> TrainConfig:
    """The engine configuration the options describe (``--smoke``: 2 batches per epoch, no bars)."""
    return TrainConfig(
        device=args.device,
        amp=not args.no_amp,
        channels_last=not args.no_channels_last,
        compile=args.compile,
        cache_teacher=not args.no_teacher_cache,
        max_batches=2 if args.smoke and args.max_batches is None else args.max_batches,
        progress=not (args.no_progress or args.smoke),
        deterministic=args.deterministic,
        stop_after_epoch=args.stop_after_epoch,
        stop_after_step=args.stop_after_step,
        checkpoint_every=args.checkpoint_every,
        out_dir=args.out if args.out is not None else Path("runs") / recipe,
    )


def load_splits(args: argparse.Namespace, ctx: Context, *, default_val: int) -> DataSplits:
    """Load the data the options name; ``--smoke`` keeps 256 train / 64 val / 128 test images."""
    val = args.val_size if args.val_size is not None else default_val
    train_subset, test_subset = args.train_subset, args.test_subset
    if args.smoke:
        val = min(val, 64)
        train_subset = min(train_subset or 256, 256)
        test_subset = min(test_subset or 128, 128)
    t0 = time.perf_counter()
    splits = load_dataset(
        args.dataset,
        args.data_root,
        val_size=val,
        download=args.download,
        num_workers=args.workers,
        train_subset=train_subset,
        test_subset=test_subset,
    )
    ctx.log(f"data: {splits.description} (loaded in {time.perf_counter() - t0:.1f} s)")
    return splits


def _on(device: torch.device, s: TensorSplit) -> TensorSplit:
    return TensorSplit(s.images.to(device), s.labels.to(device))


def storage_device(ctx: Context, splits: DataSplits, *, fraction: float = 0.5) -> torch.device:
    """``ctx.device`` when the uint8 splits take at most ``fraction`` of the free GPU memory, else the CPU."""
    if ctx.device.type != "cuda":
        return ctx.device
    need = sum(s.images.nbytes for s in (splits.train, splits.val, splits.test) if isinstance(s, TensorSplit))
    free, _ = torch.cuda.mem_get_info(ctx.device)
    if need <= fraction * free:
        return ctx.device
    ctx.log(f"data ({need / 2**30:.1f} GiB) do not fit in GPU memory ({free / 2**30:.1f} GiB free): kept on the CPU")
    return torch.device("cpu")


def run_data(
    ctx: Context,
    splits: DataSplits,
    *,
    seed: int,
    batch_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    crop_padding: int = 0,
    flip: bool = False,
) -> RunData:
    """Tensor batch sources of one seed (train shuffled by the seed, sharded by rank) and augmentations.

    The splits are moved to the device once (kept in ``splits`` for the next seeds) when they fit
    (:func:`storage_device`), else kept on the CPU and copied batch by batch.
    """
    storage = storage_device(ctx, splits)
    for name in ("train", "val", "test"):
        s = getattr(splits, name)
        if s is not None and not isinstance(s, TensorSplit):
            raise TypeError(f"run_data needs tensor splits; {name} is {type(s).__name__}")
        if isinstance(s, TensorSplit) and s.images.device != storage:
            setattr(splits, name, _on(storage, s))  # moved once, reused by every run
    train, val, test = cast(TensorSplit, splits.train), splits.val, cast(TensorSplit, splits.test)
    shard: dict[str, Any] = {"rank": ctx.rank, "world_size": ctx.world_size, "storage": storage}
    ebs = ctx.config.eval_batch_size
    return RunData(
        train=TensorBatches(train, batch_size, ctx.device, shuffle=True, seed=seed, **shard),
        val=TensorBatches(val, ebs, ctx.device, **shard) if isinstance(val, TensorSplit) else None,
        test=TensorBatches(test, ebs, ctx.device, **shard),
        train_augment=TensorAugment(
            mean, std, crop_padding=crop_padding, flip=flip, channels_last=ctx.use_channels_last
        ),
        eval_augment=TensorAugment(mean, std, channels_last=ctx.use_channels_last),
    )


def finish(
    ctx: Context, args: argparse.Namespace, recipe: str, results: Sequence[RunResult], meta: dict[str, Any]
) -> None:
    """Write the reports (rank 0) and print the table to stdout."""
    if not ctx.is_main:
        return
    meta = {
        "recipe": recipe,
        "seeds": args.seeds,
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"},
        "environment": environment(ctx),
        **meta,
    }
    wall = time.perf_counter() - ctx.started
    meta["wall_time_s"] = wall
    paths = _write_reports(ctx.config.out_dir, results, meta, ctx=ctx)
    print(markdown_table(summarise(results)), end="")
    print(f"\n{len(results)} runs in {wall:.0f} s of wall time; wrote {', '.join(str(p) for p in paths.values())}")
