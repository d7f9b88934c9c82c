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
import contextlib
import importlib.util
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

import torch

from reference_trainers.data import (
    DECODE_MODES,
    DataSplits,
    TensorAugment,
    TensorBatches,
    TensorSplit,
    count_images,
    load_dataset,
)
from reference_trainers.engine import Context, RunData, RunResult, TrainConfig, environment, markdown_table, summarise
from reference_trainers.engine import write_reports as _write_reports
from reference_trainers.errors import DataError, TrainerError

__all__ = [
    "DATASETS",
    "EMBEDDED_TRAIN_IMAGES",
    "TRAINER_MODULES",
    "add_common_arguments",
    "add_decode_argument",
    "check_data_arguments",
    "check_device",
    "check_extras",
    "check_output",
    "config_from_args",
    "default_threads",
    "describe_default",
    "device_name",
    "existing_file",
    "existing_path",
    "finish",
    "load_splits",
    "nonnegative_float",
    "nonnegative_int",
    "open_unit_float",
    "positive_float",
    "positive_int",
    "prepare_output",
    "resolved_dataset",
    "run_data",
    "storage_device",
    "unit_float",
]


def _number(s: str, kind: type[int] | type[float]) -> int | float:
    try:
        v = kind(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {s!r}") from None
    if isinstance(v, float) and not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {s!r}")
    return v


_N = TypeVar("_N", int, float)


def _argument_type(name: str, kind: type[_N], within: Callable[[_N], bool], expected: str) -> Callable[[str], _N]:
    """The argparse ``type`` ``name``: a finite ``kind`` for which ``within`` holds; anything else is
    refused with "expected <expected>, got '<s>'"."""

    def parse(s: str) -> _N:
        v = kind(_number(s, kind))
        if not within(v):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {s!r}")
        return v

    parse.__name__ = parse.__qualname__ = name
    parse.__doc__ = f"argparse ``type``: {expected}."
    return parse


positive_int = _argument_type("positive_int", int, lambda v: v >= 1, "a positive integer")
nonnegative_int = _argument_type("nonnegative_int", int, lambda v: v >= 0, "an integer >= 0")
positive_float = _argument_type("positive_float", float, lambda v: v > 0, "a number > 0")
nonnegative_float = _argument_type("nonnegative_float", float, lambda v: v >= 0, "a number >= 0")
unit_float = _argument_type("unit_float", float, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")
open_unit_float = _argument_type("open_unit_float", float, lambda v: 0.0 < v < 1.0, "a number in (0, 1)")


_DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


def device_name(s: str) -> str:
    """argparse ``type``: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    if _DEVICE.fullmatch(s) is None:
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {s!r}")
    return s


def existing_path(s: str) -> Path:
    """argparse ``type``: a file or directory that exists."""
    path = Path(s)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{s!r} does not exist")
    return path


def existing_file(s: str) -> Path:
    """argparse ``type``: a file that exists."""
    path = existing_path(s)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{s!r} is not a file")
    return path


_positive_int = positive_int  # the old private name


def _seeds(s: str) -> list[int]:
    try:
        seeds = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 42,0,1, got {s!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError(f"expected at least one seed, got {s!r}")
    return seeds


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """The options every recipe accepts (a recipe sets its own defaults with ``set_defaults``;
    the help shows them through ``%(default)s``)."""
    g = p.add_argument_group("run")
    g.add_argument("--out", type=Path, default=None, help="output directory (default: runs/<recipe>)")
    g.add_argument(
        "--seeds", type=_seeds, default=[42], help="comma-separated seeds, e.g. 42,0,1 (default: %(default)s)"
    )
    g.add_argument("--epochs", type=positive_int, default=None, help="epochs per phase (default: %(default)s)")
    g.add_argument("--batch-size", type=positive_int, default=128, help="batch size per process (default: %(default)s)")
    again = g.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    again.add_argument(
        "--overwrite",
        action="store_true",
        help="start over when --out already holds checkpoints (they are deleted first); without it, such a run "
        "is refused",
    )
    g.add_argument("--stop-after-epoch", type=positive_int, default=None, help=argparse.SUPPRESS)
    g.add_argument("--stop-after-step", type=positive_int, default=None, help=argparse.SUPPRESS)
    g.add_argument(
        "--checkpoint-every",
        type=positive_int,
        default=None,
        metavar="N",
        help="also checkpoint every N steps inside an epoch (default: epoch ends; Ctrl-C always writes one)",
    )
    g.add_argument("--smoke", action="store_true", help="a few batches of everything on a small subset")
    g.add_argument("--max-batches", type=positive_int, default=None, help="cap on batches per epoch")
    g.add_argument("--no-progress", action="store_true", help="no progress bars (then tqdm is not needed)")
    g = p.add_argument_group("speed")
    g.add_argument(
        "--device",
        type=device_name,
        default="auto",
        help="auto (CUDA when available), cpu, cuda, cuda:N (default: auto)",
    )
    g.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    g.add_argument("--no-channels-last", action="store_true", help="no channels-last on CUDA")
    g.add_argument("--compile", action="store_true", help="torch.compile the student")
    g.add_argument("--no-teacher-cache", action="store_true", help="run the teacher on every batch")
    g.add_argument("--deterministic", action="store_true", help="deterministic algorithms (slower)")
    g.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="CPU threads for torch (default: the idle cores, i.e. the usable cores minus the 1-minute load "
        "average, at least 1 and at most torch's default; torch's default when OMP_NUM_THREADS is set)",
    )
    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset",
        choices=DATASETS,
        default="auto",
        help="the data set (default: %(default)s). auto: the embedded subset without --data-root, an ImageFolder "
        "when DATA_ROOT/train exists, else torchvision's CIFAR-10 files in DATA_ROOT; embedded: the 12,000-image "
        "CIFAR-10 subset in the package; cifar10 / cifar100: torchvision's files in DATA_ROOT; imagefolder: "
        "DATA_ROOT/train and DATA_ROOT/test trees",
    )
    g.add_argument("--data-root", type=Path, default=None, help="data directory (must exist)")
    g.add_argument("--download", action="store_true", help="let torchvision download CIFAR into --data-root (network)")
    g.add_argument(
        "--val-size",
        type=nonnegative_int,
        default=None,
        help="training images held out for validation, 0 for none (default: %(default)s)",
    )
    g.add_argument(
        "--workers",
        type=nonnegative_int,
        default=0,
        help="processes decoding ImageFolder data, 0 decodes in the main process (default: %(default)s)",
    )
    g.add_argument("--train-subset", type=positive_int, default=None, help="train on this many images only")
    g.add_argument("--test-subset", type=positive_int, default=None, help="test on this many images only")


def describe_default(p: argparse.ArgumentParser, option: str, help: str) -> None:
    """Replace the help of a common ``option`` whose default a recipe computes (so ``--help`` says how)."""
    for action in p._actions:  # argparse has no public lookup of an action by option string
        if option in action.option_strings:
            action.help = help
            return
    raise KeyError(f"no option {option!r} in this parser")


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


def _val_size(args: argparse.Namespace, default_val: int | None) -> int:
    val = args.val_size if args.val_size is not None else default_val
    if val is None:
        raise ValueError("no --val-size and no recipe default")
    return min(val, 64) if args.smoke else val


def load_splits(args: argparse.Namespace, ctx: Context, *, default_val: int | None = None) -> DataSplits:
    """Load the data the options name; ``--smoke`` keeps 256 train / 64 val / 128 test images.

    The validation size is ``--val-size`` (a recipe sets its default with ``set_defaults``;
    ``default_val`` is used when it did not). A run on the embedded subset that a recipe did not
    choose itself (see :func:`check_data_arguments`) says so on stderr.
    """
    val = _val_size(args, default_val)
    train_subset, test_subset = args.train_subset, args.test_subset
    if args.smoke:
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
    note = getattr(args, "embedded_note", None)
    if note:
        ctx.log(note)
    return splits


# --------------------------------------------------------------------------------------------- checks
# Everything below runs before any data is read or any model is built: a bad option stops the
# run with a one-line message (exit code 2) and nothing trained or written.

DATASETS = ("auto", "embedded", "cifar10", "cifar100", "imagefolder")
EMBEDDED_TRAIN_IMAGES = 10_000  # the training images of the embedded subset (2,000 more are its test set)
_TRAIN_IMAGES = {"embedded": EMBEDDED_TRAIN_IMAGES, "cifar10": 50_000, "cifar100": 50_000}

TRAINER_MODULES = ("torchvision", "matplotlib", "numpy")
"""Modules of the ``trainers`` extra every run needs (``tqdm`` too, unless ``--no-progress``)."""

INSTALL_TRAINERS = "pip install '.[trainers]' in a clone of kdloss (or pip install 'kdloss[trainers]')"


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent that is not a package; a module whose __spec__ is None
        return False


def check_extras(args: argparse.Namespace) -> None:
    """Raise when a module of the ``trainers`` extra this run needs is not installed (say which, and how).

    ``tqdm`` is needed only for progress bars: ``--no-progress`` (and ``--smoke``) run without it.
    """
    needed = list(TRAINER_MODULES)
    if not (args.no_progress or args.smoke):
        needed.append("tqdm")
    missing = [m for m in needed if not _installed(m)]
    if missing:
        hint = " (or pass --no-progress to run without tqdm)" if missing == ["tqdm"] else ""
        raise TrainerError(
            f"the reference trainers need the 'trainers' extra, which is not fully installed here "
            f"(missing: {', '.join(missing)}): {INSTALL_TRAINERS}{hint}"
        )


def check_device(args: argparse.Namespace) -> None:
    """``--device cuda[:N]`` needs CUDA (and an existing device index)."""
    if not args.device.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        raise TrainerError(f"--device {args.device} asks for CUDA, but torch.cuda.is_available() is False")
    index = int(args.device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise TrainerError(f"--device {args.device}: there are only {torch.cuda.device_count()} CUDA devices")


def resolved_dataset(args: argparse.Namespace) -> str:
    """What ``--dataset`` means with this ``--data-root`` (``auto`` resolved as :func:`load_dataset` does)."""
    if args.dataset != "auto":
        return str(args.dataset)
    if args.data_root is None:
        return "embedded"
    return "imagefolder" if (Path(args.data_root) / "train").is_dir() else "cifar10"


def check_data_arguments(
    args: argparse.Namespace, recipe: str, *, default_val: int | None = None, full_data: bool = False
) -> None:
    """Check the data options against each other and against what is on disk (no image is read).

    - ``--data-root`` must exist, and ``--dataset embedded`` takes none (it would be ignored);
    - ``cifar10`` / ``cifar100`` / ``imagefolder`` need ``--data-root``, except under ``--smoke``,
      which then runs on the embedded subset (and says so);
    - ``--download`` needs a CIFAR data set;
    - ``full_data``: the recipe reproduces an experiment on a full data set, so running on the
      embedded subset needs ``--dataset embedded`` (or ``--smoke``) and is announced on stderr;
    - ``--val-size`` (or the recipe's default) must leave training images: checked against the
      data set's size (known for embedded and CIFAR, counted for an ImageFolder tree).

    Sets ``args.embedded_note`` (printed by :func:`load_splits`) when the run uses the embedded
    subset although the recipe is about another data set.
    """
    args.embedded_note = None
    root = args.data_root
    if root is not None:
        if args.dataset == "embedded":
            raise TrainerError(
                f"--dataset embedded reads the subset stored in the package and takes no --data-root "
                f"(got {str(root)!r}); drop one of them"
            )
        if not Path(root).exists():
            raise DataError(f"--data-root {str(root)!r} does not exist")
        if not Path(root).is_dir():
            raise DataError(f"--data-root {str(root)!r} is not a directory")
    elif args.dataset in ("cifar10", "cifar100", "imagefolder") or (args.dataset == "auto" and full_data):
        if args.smoke:
            args.embedded_note = (
                f"note: --smoke without --data-root: {recipe} runs on the embedded CIFAR-10 subset "
                f"instead of {args.dataset if args.dataset != 'auto' else 'its data set'}"
            )
            args.dataset = "embedded"
        elif args.dataset == "auto":
            raise TrainerError(
                f"{recipe} reproduces an experiment on the full CIFAR-10 training set: pass --data-root DIR "
                "(torchvision's CIFAR-10 files, or an ImageFolder with train/ and test/), or --dataset embedded "
                f"to run on the package's {EMBEDDED_TRAIN_IMAGES:,}-image subset (accuracies not comparable)"
            )
        else:
            what = (
                "an ImageFolder root with train/ and test/"
                if args.dataset == "imagefolder"
                else ("the directory of torchvision's files; --download fetches them there")
            )
            raise TrainerError(f"--dataset {args.dataset} needs --data-root DIR ({what})")
    dataset = resolved_dataset(args)
    if args.download and dataset not in ("cifar10", "cifar100"):
        raise TrainerError(f"--download fetches torchvision's CIFAR-10/100 only; this run reads {dataset!r}")
    if full_data and dataset == "embedded" and args.embedded_note is None:
        val = _val_size(args, default_val) if (args.val_size is not None or default_val is not None) else 0
        args.embedded_note = (
            f"note: {recipe} on the embedded CIFAR-10 subset ({EMBEDDED_TRAIN_IMAGES - val:,} training images after "
            f"the {val:,}-image validation split, 2,000 test images), not the full data set: the accuracies are not "
            "comparable with the source's"
        )
    if args.val_size is None and default_val is None:
        return
    val = _val_size(args, default_val)
    n = _TRAIN_IMAGES.get(dataset)
    if dataset == "imagefolder" and root is not None and (Path(root) / "train").is_dir():
        n = count_images(Path(root) / "train")
    if n is not None and val >= n:
        where = f"--data-root {str(root)!r}" if root is not None else "the embedded subset"
        raise TrainerError(
            f"--val-size {val} must be smaller than the {n:,} training images of {where} "
            f"(0 trains on all of them without a validation split)"
        )


def default_threads() -> tuple[int, str]:
    """CPU threads for a run without ``--threads``, and why: the idle cores.

    The usable cores (``os.sched_getaffinity``) minus the 1-minute load average, rounded, at
    least 1 and at most torch's default. Running as many threads as cores on a machine busy with
    other work makes every parallel region wait for a preempted thread: on a shared 2-core machine
    one thread is several times faster than two. ``OMP_NUM_THREADS`` (set by ``torchrun``, or by
    you) wins: then torch's default is kept.
    """
    current = torch.get_num_threads()
    if os.environ.get("OMP_NUM_THREADS"):
        return current, f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return current, "torch's default (no load average here)"
    idle = max(1, min(current, round(cores - load)))
    return idle, f"{cores} usable cores, 1-minute load average {load:.1f}"


def check_output(args: argparse.Namespace) -> list[Path]:
    """Check ``--out`` (after every other check): a directory (or creatable), writable, and holding no
    earlier run's checkpoints unless ``--resume`` or ``--overwrite``; return those checkpoints.

    Writability is tested by writing and deleting a 1 MiB file (a full disk, a read-only mount,
    missing permissions fail here, not after training); directories created for the test are
    removed again when it fails.
    """
    out = Path(args.out)
    for p in (out, *out.parents):
        if p.is_dir():
            break
        if p.exists() or p.is_symlink():
            detail = "" if p == out else f" ({str(p)!r} is a file)"
            raise TrainerError(f"--out {str(out)!r} must be a directory, but it is in the way of a file{detail}")
    found = sorted((out / "checkpoints").glob("*.pt")) if (out / "checkpoints").is_dir() else []
    if found and not (args.resume or args.overwrite):
        names = ", ".join(p.name for p in found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        raise TrainerError(
            f"--out {str(out)!r} already holds checkpoints of an earlier run ({names}): pass --resume to continue "
            "it, --overwrite to start over (they are deleted), or another --out"
        )
    _probe_writable(out)
    if (out / "checkpoints").is_dir():
        _probe_writable(out / "checkpoints")
    return found


_PROBE_BYTES = 1 << 20


def _probe_writable(out: Path) -> None:
    created: list[Path] = []
    p = out
    while not p.exists() and p != p.parent:
        created.append(p)
        p = p.parent
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out, prefix=".write-test-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(bytes(_PROBE_BYTES))
                f.flush()
                os.fsync(f.fileno())
        finally:
            os.unlink(tmp)
    except OSError as e:
        for d in created:  # deepest first
            with contextlib.suppress(OSError):
                d.rmdir()
        raise TrainerError(f"--out {str(out)!r} is not writable: {e.strerror or e}") from e


def prepare_output(args: argparse.Namespace, found: Sequence[Path]) -> None:
    """After the checks: ``--overwrite`` deletes the earlier checkpoints ``found``; ``--resume`` with
    none says that every run starts from scratch. Only the main process deletes."""
    main = int(os.environ.get("RANK", "0")) == 0
    if args.overwrite and found and main:
        for p in found:
            p.unlink(missing_ok=True)
        print(f"--overwrite: deleted {len(found)} checkpoints of an earlier run in {str(args.out)!r}", file=sys.stderr)
    if args.resume and not found and main:
        print(
            f"--resume: no checkpoint in {str(Path(args.out) / 'checkpoints')!r}, nothing to resume: every run starts "
            "from scratch",
            file=sys.stderr,
        )


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
