"""The one training loop of the reference trainers, and its results, checkpoints and reports.

A recipe describes *what* to train; this module does the rest the same way for every recipe.

The API, in the order a recipe uses it:

1. ``ctx = setup(config)``: picks the device (``"auto"``: CUDA when available), joins the
   ``torchrun`` process group when ``WORLD_SIZE > 1`` (NCCL on CUDA, gloo on CPU) and returns a
   :class:`Context` (device, rank, world size, config).
2. A :class:`DistillStep` per method: an ``nn.Module`` that owns the **student side** (the
   ``student`` plus every trainable extra: adapters, heads, memory banks, as submodules) and
   whose ``forward(images, labels, teacher)`` returns a :class:`kdloss.LossParts` (total + named
   parts). ``teacher`` is the dict the teacher side returned for these images (``None`` without
   a teacher). A step with ``needs_index = True`` also gets ``index=`` (the samples' rows in the
   training split, for memory banks). Ready-made steps are in :mod:`reference_trainers.methods`.
3. A teacher side (optional): any module mapping normalised images to a ``dict[str, Tensor]``
   (``{"logits": ..., "features": ...}``); :class:`reference_trainers.methods.TeacherOutputs`
   builds one from a trained model, tapped paths and parameter-free transforms.
4. ``result = train_run(ctx, RunSpec(...), data)`` trains one (method, seed): seeds every RNG,
   builds the step (so each method starts from the same weights for a seed), moves it to the
   device (channels-last on CUDA), optionally ``compile()``-s the student in place, wraps the
   step (student side only, never the teacher) in DDP, runs ``epochs`` epochs of
   ``optimizer.zero_grad(); loss = step(...).total; loss.backward(); optimizer.step()`` under
   bf16 autocast on CUDA, steps the scheduler once per epoch, evaluates on the validation and
   test splits, writes a checkpoint after every epoch and returns a :class:`RunResult`.
   ``RunData`` bundles the batch sources (:mod:`reference_trainers.data`) and the train / eval
   augmentations.
5. ``write_reports(out_dir, results, meta)``: ``results.json``, ``results.md`` and
   ``results.png`` (test accuracy per method as points, ± sd only over several seeds, and training
   curves).

Behaviour:

- **Teacher cache**: when the train source and its augmentation are deterministic (the same
  images every epoch) and ``config.cache_teacher`` is on, the teacher's outputs for every
  training image are computed once, kept on the device, and looked up by sample index; else the
  teacher runs under ``no_grad`` on every batch. :func:`teacher_cache` computes it up front so
  several runs can share it (``RunSpec.teacher_cache``).
- **DDP**: under ``torchrun`` the student side is wrapped in ``DistributedDataParallel``, the
  batch sources shard the data by rank, accuracies and loss means are reduced over ranks, and
  :func:`check_ranks_agree` verifies at the end of each run that all ranks hold the same weights.
- **Accuracies**: per epoch the validation accuracy; the test accuracy is measured only at the
  epochs where validation reaches a new best (ties keep the earlier epoch) and at the last
  epoch, so the reported test accuracy is the one of the model *selected on validation*,
  never selected on test. Without a validation split the selection falls back to the last epoch.
- **Checkpoints** (``<out>/checkpoints/<method>-seed<seed>.pt``) are written atomically (temp
  file in the same directory, fsync, ``os.replace``) after every epoch and hold the step's
  ``state_dict`` (student, adapters, heads, banks), optimiser, scheduler, RNG states (python,
  torch CPU and CUDA; the trainers use no numpy randomness), the epoch, the seed, the history,
  a signature of the step (class and parameter shapes) and a SHA-256 checksum of all of it
  (:func:`checkpoint_digest`). Before writing, the bytes are checked to load with
  ``weights_only=True``; they are read with ``torch.load(weights_only=True)`` only: a checkpoint
  that needs arbitrary pickle is refused (:class:`CheckpointError`), never loaded unsafely, and
  so is one whose checksum does not match (damaged data), one that is not a run's checkpoint (a
  text file, missing keys, a directory in its place: refused before anything is written), and
  one of another model, method or number of epochs.
- **Files** are created with the umask's mode (as ``open()`` would); a temp file that a killed
  write left behind is removed by the next write of that file and when a run starts. A file
  that cannot be written (a full disk, a read-only directory) raises :class:`OutputError`, a
  one-line message (exit code 2 in the CLI).
- **Resume** (``RunSpec.resume``): a finished checkpoint returns its stored result without
  training; a partial one continues after its last epoch with every state restored, so the
  final weights are bit-identical to an uninterrupted run on CPU (shuffle and augmentation
  generators are derived from ``(seed, epoch)``, dropout from the restored torch RNG).
  ``config.checkpoint_every`` also writes checkpoints inside an epoch, and SIGINT / SIGTERM
  (``config.handle_signals``, single process) write one after the step in progress; a signal
  that arrives elsewhere (after a run's last step, between runs, during the teacher cache or the
  reports) stops at the next of those points (:func:`stop_signals`). Such a
  checkpoint holds the epoch's progress: steps done, the running loss sums, the augmentation
  generator, and the RNG states at the epoch's start and at the stop. A resume rebuilds the
  epoch's batch order, skips the batches already done and continues bit-identically on CPU.
- **Reports and checkpoints** are written by rank 0 only, always atomically: a failed run never
  leaves a half-written file.
- ``config.max_batches`` caps the batches per epoch (training and evaluation) for smoke runs;
  ``config.stop_after_epoch`` raises :class:`StopRequested` after that epoch's checkpoint (to
  test resuming).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import math
import os
import pickle
import platform
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn

import kdloss
from reference_trainers.data import Batch, TensorAugment
from reference_trainers.errors import CheckpointError, OutputError, TrainerError

__all__ = [
    "BatchSource",
    "Context",
    "DistillStep",
    "RunData",
    "RunResult",
    "RunSpec",
    "StopRequested",
    "TeacherCache",
    "TrainConfig",
    "atomic_write_bytes",
    "check_ranks_agree",
    "checkpoint_digest",
    "environment",
    "evaluate",
    "load_checkpoint",
    "remove_stale_temps",
    "save_checkpoint",
    "setup",
    "stop_signals",
    "summarise",
    "teacher_cache",
    "train_run",
    "write_reports",
]

_FORMAT_NAME = "reference_trainers.checkpoint/"
CHECKPOINT_FORMAT = _FORMAT_NAME + "2"


class StopRequested(TrainerError):
    """A stop on purpose: after ``TrainConfig.stop_after_epoch``/``stop_after_step`` (its checkpoint is
    written) or on SIGINT / SIGTERM (see :func:`stop_signals`); the CLI exits with code 3."""


class BatchSource(Protocol):
    """What the engine needs from a batch source (:class:`~reference_trainers.data.TensorBatches`,
    :class:`~reference_trainers.data.FolderBatches`)."""

    deterministic: bool

    @property
    def num_samples(self) -> int: ...

    def __len__(self) -> int: ...

    def batches(self, epoch: int = 0) -> Iterator[Batch]: ...


@dataclass
class TrainConfig:
    """Options shared by every run of a recipe (the CLI fills them).

    Attributes:
        device: ``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        amp: bf16 autocast on CUDA (ignored on CPU, which trains in float32).
        channels_last: channels-last weights and images on CUDA.
        compile: ``torch.compile`` the student in place (``nn.Module.compile``).
        cache_teacher: cache teacher outputs when the training pipeline is deterministic.
        max_batches: cap on batches per epoch (train and eval), for smoke runs; None: all.
        eval_batch_size: batch size of evaluation and of the teacher cache.
        progress: show tqdm progress bars (rank 0 only).
        deterministic: ``torch.use_deterministic_algorithms(True)`` and deterministic cuDNN.
        stop_after_epoch: raise :class:`StopRequested` after this epoch (1-based), for resume tests.
        checkpoint_every: also write a checkpoint every this many training steps inside an epoch
            (``None``: at the end of each epoch only); a resume continues from the step it holds.
        stop_after_step: raise :class:`StopRequested` after this many training steps of a run
            (counted over its epochs), its mid-epoch checkpoint written, for resume tests.
        handle_signals: on SIGINT / SIGTERM (single process only) finish the current step, write a
            checkpoint and raise :class:`StopRequested` (also before the next run, between
            teacher-cache batches and report files); a second signal stops at once.
        out_dir: where checkpoints and reports go.
    """

    device: str = "auto"
    amp: bool = True
    channels_last: bool = True
    compile: bool = False
    cache_teacher: bool = True
    max_batches: int | None = None
    eval_batch_size: int = 1024
    progress: bool = True
    deterministic: bool = False
    stop_after_epoch: int | None = None
    checkpoint_every: int | None = None
    stop_after_step: int | None = None
    handle_signals: bool = True
    out_dir: Path = Path("runs/out")


@dataclass
class Context:
    """The process's place in the run: device, DDP rank and world size, and the config."""

    config: TrainConfig
    device: torch.device
    rank: int = 0
    world_size: int = 1
    started: float = field(default_factory=time.perf_counter)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def use_amp(self) -> bool:
        return self.config.amp and self.device.type == "cuda"

    @property
    def use_channels_last(self) -> bool:
        return self.config.channels_last and self.device.type == "cuda"

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.use_amp:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def log(self, msg: str) -> None:
        if self.is_main:
            print(msg, file=sys.stderr, flush=True)


def setup(config: TrainConfig) -> Context:
    """Resolve the device and join the ``torchrun`` process group when ``WORLD_SIZE > 1``.

    Under torchrun each process uses ``cuda:LOCAL_RANK`` on GPUs (NCCL) or the CPU (gloo).

    Raises:
        TrainerError: if CUDA is asked for but not available.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    want = config.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise TrainerError(f"--device {config.device!r} asks for CUDA, but torch.cuda.is_available() is False")
    device = torch.device(want)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local)
    elif device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = not config.deterministic
    if config.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Context(config=config, device=device, rank=rank, world_size=world)


class DistillStep(nn.Module):
    """Base class of a method's student side: the trained modules and the loss of one step.

    Subclasses set ``self.student`` (the model that is evaluated and reported) and any extra
    trainable or stateful modules as attributes (they are then in ``parameters()``, the DDP
    wrapper and the checkpoint), and implement :meth:`forward`. The teacher is never a
    submodule: its outputs come in through ``teacher``.

    Steps that need each sample's index in the training split (a memory bank: CRD) set the class
    attribute ``needs_index = True``; the engine then calls ``forward(images, labels, teacher,
    index=index)`` with ``index (B,)`` int64 on the device: the rows of the training split the
    batch sources number from 0 to ``data.train.num_samples - 1`` (the split actually trained on,
    after a validation split is carved out; the same numbering as the teacher cache; under DDP each
    rank gets its shard's indices into the whole split). Other steps are called as before.

    Buffers that the step keeps identical on every rank itself (CRD's banks, updated from
    all-gathered embeddings) are named by :meth:`ddp_unsynced_buffers`: DDP does not broadcast
    them from rank 0 (``check_ranks_agree`` still compares them at the end of a run).
    """

    student: nn.Module
    needs_index: bool = False

    def forward(self, images: Tensor, labels: Tensor, teacher: dict[str, Tensor] | None) -> kdloss.LossParts:
        """Return the step's loss: ``LossParts(total, parts)`` with named, detached parts."""
        raise NotImplementedError

    def ddp_unsynced_buffers(self) -> list[str]:
        """Names (``named_buffers`` keys) of buffers DDP must not broadcast from rank 0 (default: none)."""
        return []

    def signature(self) -> dict[str, Any]:
        """What a checkpoint must match: the step's class and every state tensor's shape."""
        return {
            "class": type(self).__name__,
            "student": type(self.student).__name__,
            "shapes": {k: list(v.shape) for k, v in self.state_dict().items()},
        }


@dataclass
class RunData:
    """The batch sources of one run and the augmentations applied on the device.

    ``train_augment`` may be random (crop/flip); ``eval_augment`` (validation, test, teacher
    cache) should only normalise. ``val`` may be None (then no selection on validation).
    """

    train: BatchSource
    val: BatchSource | None
    test: BatchSource
    train_augment: TensorAugment
    eval_augment: TensorAugment


@dataclass
class TeacherCache:
    """Teacher outputs for every training sample (``outputs[key][i]`` for sample ``i`` of the
    split), the seconds it took to compute them, and the teacher side they came from."""

    outputs: dict[str, Tensor]
    seconds: float
    teacher: nn.Module


@dataclass
class RunSpec:
    """One (method, seed) run.

    Attributes:
        method: the method's name in the results ("teacher", "kd", ...), also the checkpoint name.
        seed: seeds python and torch before ``build`` and the data order.
        build: returns the :class:`DistillStep` (called after seeding, on the CPU).
        optimizer: ``params -> torch.optim.Optimizer``.
        epochs: number of epochs.
        scheduler: ``optimizer -> LRScheduler`` stepped once per epoch, or None.
        teacher: the teacher side (``images -> dict``), or None.
        teacher_cache: outputs of ``teacher`` precomputed by :func:`teacher_cache` (shared
            between runs); None: computed by the run itself when the pipeline allows.
        resume: continue from this run's checkpoint when there is one.
    """

    method: str
    seed: int
    build: Callable[[], DistillStep]
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer]
    epochs: int
    scheduler: Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler] | None = None
    teacher: nn.Module | None = None
    teacher_cache: TeacherCache | None = None
    resume: bool = False


@dataclass
class RunResult:
    """What one run measured (``step`` is the trained student side, not serialised).

    ``history`` holds one dict per epoch: ``epoch``, ``loss`` and the named loss parts (means
    over the epoch), ``lr``, ``val_acc``, ``test_acc`` (only where measured), ``time_s``,
    ``images`` (trained on, all ranks), ``images_per_s``. Accuracies are fractions in [0, 1].
    """

    method: str
    seed: int
    epochs: int
    history: list[dict[str, Any]]
    val_last: float | None
    val_best: float | None
    best_epoch: int
    test_selected: float
    test_last: float
    train_time_s: float
    images_per_s: float
    teacher_cache_s: float | None
    step: DistillStep | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "step"}


# --------------------------------------------------------------------------------------------- files


_TEMP_SUFFIX = ".tmp"


def _temp_pattern(path: Path) -> re.Pattern[str]:
    """The names :func:`atomic_write_bytes` gives its temp files for ``path`` (``.<name>.<8 random>.tmp``)."""
    return re.compile(rf"^\.{re.escape(path.name)}\.[a-z0-9_]{{8}}{re.escape(_TEMP_SUFFIX)}$")


def remove_stale_temps(path: str | os.PathLike[str]) -> list[Path]:
    """Remove the temp files a killed :func:`atomic_write_bytes` of ``path`` left behind; return them.

    Only the exact pattern of this module's temp files for ``path`` is removed (``.<name>.XXXXXXXX.tmp``
    in the same directory); a missing directory is not an error.
    """
    path = Path(path)
    pattern = _temp_pattern(path)
    removed: list[Path] = []
    try:
        names = os.listdir(path.parent)
    except OSError:
        return removed
    for name in names:
        if pattern.match(name):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path.parent / name)
                removed.append(path.parent / name)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a temp file in the same directory, fsync, ``os.replace``.

    Either the old file (or none) or the complete new one is there, whatever happens. The file
    gets the mode a plain ``open()`` would give it (``0o666`` less the umask). A temp file that a
    killed earlier write of ``path`` left behind is removed first (:func:`remove_stale_temps`).

    Raises:
        OutputError: the directory or file cannot be written (a full disk, a read-only
            directory, a directory in the file's place...), with the path and the reason; the old
            file, if any, is kept and no temp file is left.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TEMP_SUFFIX)
    except OSError as e:
        raise _output_error(path, e) from e
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp creates 0o600
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, OutputError):
            raise _output_error(path, e) from e
        raise
    with contextlib.suppress(OSError):  # make the rename durable (not supported everywhere)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _output_error(path: Path, e: OSError) -> OutputError:
    reason = e.strerror or str(e) or type(e).__name__
    hint = {
        errno.ENOSPC: "free some space or choose another --out",
        errno.EDQUOT: "free some space or choose another --out",
        errno.EROFS: "the file system is read-only: choose another --out",
        errno.EACCES: "fix the permissions or choose another --out",
        errno.EPERM: "fix the permissions or choose another --out",
        errno.EISDIR: "a directory is in the file's place: remove it or choose another --out",
    }.get(e.errno or -1, "check the output directory or choose another --out")
    return OutputError(e.errno or 0, f"cannot write {str(path)!r}: {reason} ({hint})")


def _feed(h: Any, x: Any) -> None:
    """Feed a checkpoint's structure into the hash ``h``: containers, scalars and tensors' bytes."""
    if isinstance(x, Tensor):
        t = x.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(x.shape)};".encode())
        h.update(t.view(torch.uint8).numpy())
    elif isinstance(x, Mapping):
        h.update(f"D{len(x)};".encode())
        for k, v in x.items():
            _feed(h, k)
            _feed(h, v)
    elif isinstance(x, (list, tuple)):
        h.update(f"L{len(x)};".encode())
        for v in x:
            _feed(h, v)
    else:  # str, int, float (repr is exact), bool, None, and anything else by its repr
        h.update(f"{type(x).__name__}:{x!r};".encode())


def checkpoint_digest(obj: Mapping[str, Any]) -> str:
    """``"sha256:<hex>"`` of a checkpoint's content (every key but ``"checksum"``), tensors by their bytes."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in obj.items() if k != "checksum"})
    return "sha256:" + h.hexdigest()


def save_checkpoint(obj: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """Add a checksum of ``obj``, ``torch.save`` it to memory, check that it loads with
    ``weights_only=True`` and gives the same checksum, then :func:`atomic_write_bytes`.

    The checksum (``obj["checksum"]``, :func:`checkpoint_digest`: SHA-256 over every key, value
    and tensor byte) is verified by :func:`load_checkpoint`, so a damaged file is refused
    instead of resumed from.

    Raises:
        TypeError: if ``obj`` holds something ``weights_only`` loading would refuse (nothing is written).
        OutputError: the file cannot be written (see :func:`atomic_write_bytes`).
    """
    state = dict(obj)
    state["checksum"] = checkpoint_digest(state)
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    try:
        back = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise TypeError(f"checkpoint for {str(path)!r} holds objects weights_only loading refuses: {e}") from e
    if checkpoint_digest(back) != state["checksum"]:  # a value that does not survive the round trip
        raise TypeError(f"checkpoint for {str(path)!r} does not load back to what was saved; nothing was written")
    atomic_write_bytes(path, data)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a checkpoint with ``torch.load(weights_only=True)`` and verify its checksum.

    Never falls back to unsafe pickle.

    Raises:
        CheckpointError: if the path is missing or not a file, the file is truncated, damaged
            (its checksum does not match its content), not a checkpoint of this package (or of
            an older format), or needs arbitrary pickle (the message says it was refused).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a file (a directory?): remove it or choose another --out"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "weights_only" not in str(e) and "Weights only" not in str(e):
            raise CheckpointError(f"cannot read checkpoint {str(path)!r} (damaged or not a torch file): {first}") from e
        raise CheckpointError(
            f"refusing to load checkpoint {str(path)!r}: it is not loadable with weights_only=True "
            f"(it holds arbitrary Python objects, which could run code); it was not loaded. ({first})"
        ) from e
    except Exception as e:  # a text file, a truncated zip...: torch raises KeyError, RuntimeError, EOFError...
        first = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(
            f"cannot read checkpoint {str(path)!r} (truncated, damaged or not a torch file): "
            f"{type(e).__name__}: {first}"
        ) from e
    if not isinstance(obj, dict) or not str(obj.get("format", "")).startswith(_FORMAT_NAME):
        raise CheckpointError(f"{str(path)!r} is not a reference_trainers checkpoint (format {CHECKPOINT_FORMAT})")
    if obj["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has format {obj['format']!r}, this version reads {CHECKPOINT_FORMAT!r} "
            "(with a checksum): start the run over (drop --resume) or choose another --out"
        )
    stored = obj.get("checksum")
    actual = checkpoint_digest(obj)
    if stored != actual:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is damaged: its content does not match its checksum (stored "
            f"{str(stored)[:22]}..., computed {actual[:22]}...); it was not used. Restore it from a copy, "
            "or delete it to start this run over"
        )
    return obj


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode()


# --------------------------------------------------------------------------------------------- environment


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment(ctx: Context) -> dict[str, Any]:
    """Versions and hardware to record with the results."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "kdloss": kdloss.__version__,
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(ctx.device),
        "world_size": ctx.world_size,
        "git_commit": _git_commit(),
        "argv": sys.argv,
    }
    with contextlib.suppress(ImportError):
        import torchvision

        env["torchvision"] = torchvision.__version__
    if ctx.device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(ctx.device)
        env["cuda"] = torch.version.cuda
    return env


# --------------------------------------------------------------------------------------------- RNG


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state(), "cuda": None}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]  # unannotated in torch
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------- loop


def _limited(it: Iterator[Batch], max_batches: int | None) -> Iterator[Batch]:
    for i, b in enumerate(it):
        if max_batches is not None and i >= max_batches:
            return
        yield b


def evaluate(ctx: Context, model: nn.Module, source: BatchSource, augment: TensorAugment) -> float:
    """Top-1 accuracy of ``model`` on ``source`` (summed over DDP ranks), in [0, 1]."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=ctx.device)
    total = torch.zeros((), dtype=torch.int64, device=ctx.device)
    with torch.no_grad(), ctx.autocast():
        for b in _limited(source.batches(0), ctx.config.max_batches):
            logits = model(augment.normalise(b.images))
            correct += (logits.argmax(1) == b.labels).sum()
            total += b.labels.numel()
    if ctx.distributed:
        both = torch.stack([correct, total])
        dist.all_reduce(both)
        correct, total = both[0], both[1]
    model.train(was_training)
    return float(correct) / max(1, int(total))


def _prepare_teacher(ctx: Context, teacher: nn.Module) -> None:
    teacher.to(ctx.device).eval()
    if ctx.use_channels_last:
        teacher.to(memory_format=torch.channels_last)


def teacher_cache(ctx: Context, teacher: nn.Module, data: RunData) -> TeacherCache | None:
    """Compute the teacher's outputs on every training sample once, when that is valid.

    Returns None when ``config.cache_teacher`` is off or the training pipeline is random (a
    random augmentation or a non-deterministic source): the teacher must then run online. A
    recipe can compute it once and pass it to several runs (``RunSpec.teacher_cache``) that use
    the same teacher side (same keys); otherwise :func:`train_run` computes it per run.
    """
    if not (ctx.config.cache_teacher and data.train.deterministic and data.train_augment.deterministic):
        return None
    with _guard(ctx):
        return _teacher_cache(ctx, teacher, data)


def _teacher_cache(ctx: Context, teacher: nn.Module, data: RunData) -> TeacherCache:
    _prepare_teacher(ctx, teacher)
    source, augment = data.train, data.eval_augment
    full = getattr(source, "all_batches", None)
    if full is None:
        raise TrainerError(f"{type(source).__name__} cannot be cached: it has no all_batches()")
    t0 = time.perf_counter()
    cache: dict[str, Tensor] = {}
    n = source.num_samples
    with torch.no_grad(), ctx.autocast():
        for b in full(ctx.config.eval_batch_size):
            _STOP.check("while caching the teacher's outputs (the teacher's checkpoint is written)")
            out = teacher(augment.normalise(b.images))
            for k, v in out.items():
                if k not in cache:
                    cache[k] = torch.empty((n, *v.shape[1:]), dtype=v.dtype, device=ctx.device)
                cache[k][b.index] = v
    _STOP.check("while caching the teacher's outputs (the teacher's checkpoint is written)")
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    ctx.log(f"teacher outputs ({', '.join(cache)}) of {n} training images cached in {seconds:.1f} s")
    return TeacherCache(cache, seconds, teacher)


class _NoBar:
    """What a disabled progress bar does: nothing (so runs without bars need no tqdm)."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(ctx: Context, total: int, desc: str) -> Any:
    if not (ctx.config.progress and ctx.is_main):
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit="batch",
        leave=False,
        dynamic_ncols=True,
        disable=not (ctx.config.progress and ctx.is_main),
    )


class _StopSignals:
    """SIGINT / SIGTERM: the first asks the work in progress to stop at its next safe point, a second stops at once.

    One per process (:data:`_STOP`). Its handlers are installed while a guard is held
    (:func:`stop_signals`, which the CLI holds around a whole recipe, or the guard that
    :func:`train_run`, :func:`teacher_cache` and :func:`write_reports` each hold); the outermost
    guard installs them and clears any earlier request, and its exit restores the previous
    handlers. Installed only in the main thread of a single process (under ``torchrun`` the
    launcher handles signals). A request stays set until the outermost guard exits, so that
    every later phase (the next run, the teacher cache, the reports) stops as well.

    The safe points: after the training step in progress (a mid-epoch checkpoint is written),
    after an epoch, before a run starts, after a run's last epoch (its final checkpoint is
    written), between batches of the teacher cache, and between the report files. Each raises
    :class:`StopRequested` (the CLI's exit code 3). A second signal raises it at once, wherever
    the program is (the last checkpoint written is kept; files are written atomically).
    """

    _SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested: str | None = None  # the name of the signal that asked to stop
        self._previous: dict[int, Any] = {}
        self._depth = 0

    def enter(self, enabled: bool = True) -> bool:
        """Hold a guard; install the handlers if this is the outermost one. Returns whether one is held."""
        if not enabled or threading.current_thread() is not threading.main_thread():
            return False
        if self._depth == 0:
            self.requested = None
            for sig in self._SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        self._depth += 1
        return True

    def exit(self) -> None:
        self._depth -= 1
        if self._depth == 0:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
            self._previous = {}
            self.requested = None  # honoured (or not) by now; no guard held, nothing to stop

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None:
            raise StopRequested(
                f"a second {name}: stopped at once; the last checkpoint written is kept, continue with --resume"
            )
        self.requested = name
        print(
            f"{name}: stopping at the next safe point (after the step in progress, with a checkpoint); "
            "send it again to stop at once",
            file=sys.stderr,
            flush=True,
        )

    def check(self, where: str, then: str = "continue with --resume") -> None:
        """Raise :class:`StopRequested` if a stop was asked for; ``where`` completes "stopped ..."."""
        if self.requested is not None:
            raise StopRequested(f"stopped {where} ({self.requested}); {then}")


_STOP = _StopSignals()


def _why(signals: _StopSignals) -> str:
    return f" ({signals.requested})" if signals.requested is not None else ""


@contextlib.contextmanager
def stop_signals(enabled: bool = True) -> Iterator[None]:
    """Honour SIGINT / SIGTERM for the whole block (a recipe): see :class:`_StopSignals`.

    The CLI holds it around a recipe, so that a signal between runs, during the teacher cache or
    while the reports are written stops the program at the next safe point with exit code 3;
    a request that arrives after the last safe point is honoured when the block ends.

    Raises:
        StopRequested: at the end of the block, if a stop was asked for and nothing raised it yet.
    """
    held = _STOP.enter(enabled)
    try:
        yield
        if held:
            _STOP.check("after the last step, with every file written", "nothing is left to resume")
    finally:
        if held:
            _STOP.exit()


@contextlib.contextmanager
def _guard(ctx: Context) -> Iterator[None]:
    held = _STOP.enter(ctx.config.handle_signals and not ctx.distributed)
    try:
        yield
    finally:
        if held:
            _STOP.exit()


def train_run(ctx: Context, spec: RunSpec, data: RunData) -> RunResult:
    """Train one (method, seed); see the module docstring for everything it does.

    Raises:
        CheckpointError: resuming from a checkpoint of another method, seed or model.
        StopRequested: after ``config.stop_after_epoch`` (the checkpoint of that epoch is written).
    """
    with _guard(ctx):
        return _train_run(ctx, spec, data)


def _train_run(ctx: Context, spec: RunSpec, data: RunData) -> RunResult:
    cfg = ctx.config
    if spec.epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {spec.epochs}")
    ckpt_path = Path(cfg.out_dir) / "checkpoints" / f"{spec.method}-seed{spec.seed}.pt"
    _STOP.check(f"before {spec.method!r} seed {spec.seed} started")
    if ckpt_path.exists() and not ckpt_path.is_file():
        raise CheckpointError(
            f"{str(ckpt_path)!r}, where this run's checkpoint goes, is not a file (a directory?): "
            "remove it or choose another --out"
        )
    if ctx.is_main:
        for stale in remove_stale_temps(ckpt_path):  # left by a write that was killed
            ctx.log(f"removed {stale}, a temp file of an interrupted checkpoint write")
    _seed_everything(spec.seed)
    step = spec.build()
    if not isinstance(step, DistillStep):
        raise TypeError(f"RunSpec.build must return a DistillStep, got {type(step).__name__}")
    _STOP.check(f"before {spec.method!r} seed {spec.seed} started (its model built)")
    step.to(ctx.device)
    if ctx.use_channels_last:
        step.to(memory_format=torch.channels_last)
    params = [p for p in step.parameters() if p.requires_grad]
    optimizer = spec.optimizer(params)
    kdloss.check_optimizer(optimizer, step)
    scheduler = spec.scheduler(optimizer) if spec.scheduler is not None else None
    signature = step.signature()

    history: list[dict[str, Any]] = []
    start_epoch, train_time, images_seen, run_steps = 0, 0.0, 0, 0
    resume_rng: dict[str, Any] | None = None  # restored when the first resumed epoch starts
    partial: dict[str, Any] | None = None  # the progress of an epoch stopped part-way
    best: dict[str, Any] = {"val": None, "epoch": 0, "test": None}
    if spec.resume and ckpt_path.is_file():
        ck = load_checkpoint(ckpt_path)
        _check_run_checkpoint(ck, ckpt_path)
        if (ck["method"], ck["seed"]) != (spec.method, spec.seed) or ck["signature"] != signature:
            got = ck.get("signature", {})
            mismatched = sorted(
                set(map(str, got.get("shapes", {}).items())) ^ set(map(str, signature["shapes"].items()))
            )
            raise CheckpointError(
                f"checkpoint {str(ckpt_path)!r} was written for method {ck['method']!r} seed {ck['seed']} "
                f"({got.get('class')} / {got.get('student')}), but this run is {spec.method!r} seed {spec.seed} "
                f"({signature['class']} / {signature['student']}); differing state: {mismatched[:4]}"
            )
        if int(ck["epochs"]) != spec.epochs:
            raise CheckpointError(
                f"checkpoint {str(ckpt_path)!r} belongs to a run of {ck['epochs']} epochs, this run asks for "
                f"{spec.epochs}; resume with the same --epochs, or use another --out / drop --resume to start over"
            )
        try:
            step.load_state_dict(ck["model"])
            optimizer.load_state_dict(ck["optimizer"])
            if scheduler is not None and ck["scheduler"] is not None:
                scheduler.load_state_dict(ck["scheduler"])
            history, best = list(ck["history"]), dict(ck["best"])
            start_epoch, train_time, images_seen = int(ck["epoch"]), float(ck["train_time_s"]), int(ck["images"])
            run_steps, resume_rng, partial = int(ck.get("run_steps", 0)), ck["rng"], ck.get("partial")
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
            raise CheckpointError(
                f"checkpoint {str(ckpt_path)!r} cannot be resumed from ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); it was not changed: remove it or choose another --out"
            ) from e
        where = f"after epoch {start_epoch}"
        if partial is not None:
            where = f"at step {partial['steps']} of epoch {start_epoch + 1}"
        ctx.log(f"[{spec.method} seed {spec.seed}] resumed from {ckpt_path} {where}")
        if ck["done"]:
            return _result(spec, history, best, train_time, images_seen, ck.get("teacher_cache_s"), step)

    if cfg.compile:
        step.student.compile()
    model: nn.Module = step
    unsynced = set(step.ddp_unsynced_buffers())
    if ctx.distributed:
        if unsynced:  # DDP neither broadcasts these buffers from rank 0 nor checks them
            ddp_cls = nn.parallel.DistributedDataParallel
            ddp_cls._set_params_and_buffers_to_ignore_for_model(step, sorted(unsynced))  # type: ignore[no-untyped-call]
        model = nn.parallel.DistributedDataParallel(
            step, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None
        )

    teacher = spec.teacher
    cache: dict[str, Tensor] | None = None
    cache_time: float | None = None
    if teacher is not None:
        _prepare_teacher(ctx, teacher)
        tc = spec.teacher_cache
        if tc is not None and tc.teacher is not teacher:
            raise ValueError("RunSpec.teacher_cache was computed from another teacher side than RunSpec.teacher")
        if tc is None and cfg.cache_teacher:
            tc = teacher_cache(ctx, teacher, data)
        if tc is not None and cfg.cache_teacher:
            cache, cache_time = tc.outputs, tc.seconds

    aug_gen_device = ctx.device if ctx.device.type == "cuda" else torch.device("cpu")

    def checkpoint(epochs_done: int, done: bool, progress: dict[str, Any] | None) -> None:
        """Write this run's checkpoint (rank 0): after ``epochs_done`` epochs, plus ``progress`` inside the next."""
        if not ctx.is_main:
            return
        state = {
            "format": CHECKPOINT_FORMAT,
            "method": spec.method,
            "seed": spec.seed,
            "signature": signature,
            "epoch": epochs_done,
            "epochs": spec.epochs,
            "done": done,
            "model": step.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": _rng_state(),
            "history": history,
            "best": best,
            "train_time_s": train_time,
            "images": images_seen,
            "run_steps": run_steps,
            "teacher_cache_s": cache_time,
            "torch": str(torch.__version__),
        }
        if progress is not None:
            state["partial"] = progress
        save_checkpoint(state, ckpt_path)

    signals = _STOP  # its handlers are held by train_run's guard
    for epoch in range(start_epoch, spec.epochs):
        model.train()
        resumed_here = partial if epoch == start_epoch else None
        if epoch == start_epoch and resume_rng is not None:
            _set_rng_state(resumed_here["rng_epoch_start"] if resumed_here is not None else resume_rng)
        rng_epoch_start = _rng_state()  # what a mid-epoch checkpoint needs to rebuild this epoch's batches
        aug_gen = torch.Generator(device=aug_gen_device).manual_seed(spec.seed * 1_000_003 + epoch + 7)
        n_batches = len(data.train) if cfg.max_batches is None else min(len(data.train), cfg.max_batches)
        batches = _limited(data.train.batches(epoch), cfg.max_batches)
        sums: dict[str, Tensor] = {}
        seen = steps = 0
        elapsed = 0.0
        stop_at_epoch_end = False  # stop_after_step fell on the epoch's last step
        if resumed_here is not None:
            if int(resumed_here["n_batches"]) != n_batches:
                raise CheckpointError(
                    f"checkpoint {str(ckpt_path)!r} stopped at step {resumed_here['steps']} of an epoch of "
                    f"{resumed_here['n_batches']} batches, but this run's epochs have {n_batches}: resume with "
                    "the same data, --batch-size and --max-batches, or drop --resume to start over"
                )
            for _ in range(int(resumed_here["steps"])):  # the batches the stopped run had trained on
                next(batches)
            aug_gen.set_state(resumed_here["aug_gen"])
            sums = {k: v.to(ctx.device) for k, v in resumed_here["sums"].items()}
            seen, steps = int(resumed_here["seen"]), int(resumed_here["steps"])
            elapsed = float(resumed_here["time_s"])
            _set_rng_state(resumed_here["rng"])
        bar = _progress(ctx, n_batches, f"{spec.method} s{spec.seed} epoch {epoch + 1}/{spec.epochs}")
        bar.update(steps)
        update_every = max(1, n_batches // 20)
        t0 = time.perf_counter() - elapsed
        for i, b in enumerate(batches, start=steps):
            x = data.train_augment(b.images, aug_gen)
            t_out: dict[str, Tensor] | None = None
            if cache is not None:
                t_out = {k: v[b.index] for k, v in cache.items()}
            elif teacher is not None:
                with torch.no_grad(), ctx.autocast():
                    t_out = teacher(x)
            with ctx.autocast():
                if step.needs_index:
                    out: kdloss.LossParts = model(x, b.labels, t_out, index=b.index)
                else:
                    out = model(x, b.labels, t_out)
            optimizer.zero_grad(set_to_none=True)
            out.total.backward()  # type: ignore[no-untyped-call]  # Tensor.backward is unannotated in torch
            optimizer.step()
            for k, v in out.parts.items():
                sums[k] = sums[k] + v.float() if k in sums else v.float().clone()
            seen += b.labels.numel()
            steps += 1
            run_steps += 1
            bar.update(1)
            if (i + 1) % update_every == 0 or i + 1 == n_batches:
                elapsed = time.perf_counter() - t0
                img_s = f"{seen * ctx.world_size / elapsed:.0f}"
                bar.set_postfix(loss=f"{float(out.parts['total']):.4f}", img_s=img_s)
            stop_step = cfg.stop_after_step is not None and run_steps == cfg.stop_after_step
            if steps == n_batches:  # the epoch's end writes its own checkpoint, and stops there if asked
                stop_at_epoch_end = stop_step
                continue
            stop = stop_step or signals.requested is not None
            if stop or (cfg.checkpoint_every is not None and steps % cfg.checkpoint_every == 0):
                checkpoint(
                    epoch,
                    False,
                    {
                        "steps": steps,
                        "n_batches": n_batches,
                        "seen": seen,
                        "sums": {k: v.detach().cpu() for k, v in sums.items()},
                        "time_s": time.perf_counter() - t0,
                        "aug_gen": aug_gen.get_state(),
                        "rng": _rng_state(),
                        "rng_epoch_start": rng_epoch_start,
                    },
                )
                ctx.barrier()
            if stop:
                bar.close()
                raise StopRequested(
                    f"stopped at step {steps} of epoch {epoch + 1} of {spec.method!r} seed {spec.seed} "
                    f"(checkpoint {str(ckpt_path)!r} written){_why(signals)}; continue with --resume"
                )
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        epoch_time = time.perf_counter() - t0
        bar.close()
        if scheduler is not None:
            scheduler.step()
        if ctx.distributed:  # DDP syncs buffers (BatchNorm statistics) before each forward: do it once more
            for name, buf in step.named_buffers():
                if name not in unsynced:  # those the step keeps identical itself (CRD's banks)
                    dist.broadcast(buf, 0)
        if steps == 0:
            raise TrainerError(f"{spec.method!r}: the training split gave no batch (empty, or smaller than one batch?)")
        means = {k: float(v) / steps for k, v in sums.items()}
        if ctx.distributed:
            vec = torch.tensor([means[k] for k in sorted(means)], dtype=torch.float64, device=ctx.device)
            dist.all_reduce(vec)
            means = {k: float(v) / ctx.world_size for k, v in zip(sorted(means), vec.tolist())}
        global_seen = seen * ctx.world_size
        train_time += epoch_time
        images_seen += global_seen
        rec: dict[str, Any] = {
            "epoch": epoch + 1,
            "loss": means.get("total", float("nan")),
            "parts": {k: v for k, v in means.items() if k != "total"},
            "lr": optimizer.param_groups[0]["lr"],
            "time_s": epoch_time,
            "images": global_seen,
            "images_per_s": global_seen / epoch_time if epoch_time > 0 else float("nan"),
            "val_acc": None,
            "test_acc": None,
        }
        last = epoch + 1 == spec.epochs
        if data.val is not None:
            rec["val_acc"] = evaluate(ctx, step.student, data.val, data.eval_augment)
            if best["val"] is None or rec["val_acc"] > best["val"]:
                best = {"val": rec["val_acc"], "epoch": epoch + 1, "test": None}
        if (data.val is not None and best["epoch"] == epoch + 1) or last:
            rec["test_acc"] = evaluate(ctx, step.student, data.test, data.eval_augment)
            if best["epoch"] == epoch + 1:
                best["test"] = rec["test_acc"]
        history.append(rec)
        msg = f"[{spec.method} seed {spec.seed}] epoch {epoch + 1}/{spec.epochs} loss {rec['loss']:.4f}"
        if rec["val_acc"] is not None:
            msg += f" val {100 * rec['val_acc']:.2f}%"
        if rec["test_acc"] is not None:
            msg += f" test {100 * rec['test_acc']:.2f}%"
        ctx.log(msg + f" ({rec['images_per_s']:.0f} img/s)")
        checkpoint(epoch + 1, last, None)
        ctx.barrier()
        if cfg.stop_after_epoch is not None and epoch + 1 == cfg.stop_after_epoch and not last:
            raise StopRequested(
                f"stopped after epoch {epoch + 1} of {spec.method!r} seed {spec.seed} as asked "
                f"(--stop-after-epoch); continue with --resume"
            )
        if (stop_at_epoch_end or signals.requested is not None) and not last:
            raise StopRequested(
                f"stopped after epoch {epoch + 1} of {spec.method!r} seed {spec.seed} (checkpoint "
                f"{str(ckpt_path)!r} written){_why(signals)}; continue with --resume"
            )
    if ctx.distributed:
        check_ranks_agree(ctx, step)
        ctx.log(f"[{spec.method} seed {spec.seed}] all {ctx.world_size} ranks hold the same weights")
    _STOP.check(f"after the last epoch of {spec.method!r} seed {spec.seed} (finished, checkpoint written)")
    return _result(spec, history, best, train_time, images_seen, cache_time, step)


_RUN_CHECKPOINT_KEYS: dict[str, type | tuple[type, ...]] = {
    "method": str,
    "seed": int,
    "signature": dict,
    "epoch": int,
    "epochs": int,
    "done": bool,
    "model": dict,
    "optimizer": dict,
    "scheduler": (dict, type(None)),
    "rng": dict,
    "history": list,
    "best": dict,
    "train_time_s": (float, int),
    "images": int,
}


def _check_run_checkpoint(ck: Mapping[str, Any], path: Path) -> None:
    """Raise :class:`CheckpointError` unless ``ck`` holds every key of a run's checkpoint, of the right type."""
    for key, kind in _RUN_CHECKPOINT_KEYS.items():
        if key not in ck:
            raise CheckpointError(f"checkpoint {str(path)!r} lacks {key!r}: it is not a run's checkpoint (or damaged)")
        if not isinstance(ck[key], kind):
            raise CheckpointError(
                f"checkpoint {str(path)!r} has {key!r} of type {type(ck[key]).__name__}: it is not a run's checkpoint"
            )


def check_ranks_agree(ctx: Context, module: nn.Module) -> None:
    """Under DDP, check that every rank holds the same parameters and buffers (two float64 checksums).

    Raises:
        TrainerError: naming the ranks whose checksums differ from rank 0's.
    """
    if not ctx.distributed:
        return
    s1 = torch.zeros((), dtype=torch.float64, device=ctx.device)
    s2 = torch.zeros((), dtype=torch.float64, device=ctx.device)
    for t in module.state_dict().values():
        if t.is_floating_point():
            flat = t.detach().flatten().double()
            s1 += flat.sum()
            s2 += (flat * torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.float64)).sum()
    mine = torch.stack([s1, s2])
    gathered = [torch.empty_like(mine) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, mine)
    bad = [r for r, g in enumerate(gathered) if not torch.equal(g, gathered[0])]
    if bad:
        raise TrainerError(f"DDP ranks {bad} hold other weights than rank 0 after training: {gathered}")


def _result(
    spec: RunSpec,
    history: list[dict[str, Any]],
    best: Mapping[str, Any],
    train_time: float,
    images_seen: int,
    cache_time: float | None,
    step: DistillStep,
) -> RunResult:
    last = history[-1]
    has_val = best["val"] is not None
    return RunResult(
        method=spec.method,
        seed=spec.seed,
        epochs=len(history),
        history=history,
        val_last=last["val_acc"],
        val_best=best["val"],
        best_epoch=int(best["epoch"]) if has_val else len(history),
        test_selected=float(best["test"]) if has_val else float(last["test_acc"]),
        test_last=float(last["test_acc"]),
        train_time_s=train_time,
        images_per_s=images_seen / train_time if train_time > 0 else float("nan"),
        teacher_cache_s=cache_time,
        step=step,
    )


# --------------------------------------------------------------------------------------------- reports


def _mean_sd(xs: Sequence[float | None]) -> tuple[float | None, float | None]:
    vals = [x for x in xs if x is not None and not math.isnan(x)]
    if not vals:
        return None, None
    m = sum(vals) / len(vals)
    # one seed has no spread: None (shown as 'n/a'), not a misleading 0
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else None
    return m, sd


def summarise(results: Sequence[RunResult]) -> list[dict[str, Any]]:
    """One row per method (in first-seen order): mean and sample standard deviation over seeds.

    Keys: ``method``, ``seeds``, ``n``, and ``<metric>_mean`` / ``<metric>_sd`` for ``val_last``,
    ``val_best``, ``test_selected``, ``test_last``, ``train_time_s``, ``images_per_s``.
    """
    rows: list[dict[str, Any]] = []
    for method in dict.fromkeys(r.method for r in results):
        rs = [r for r in results if r.method == method]
        row: dict[str, Any] = {"method": method, "seeds": [r.seed for r in rs], "n": len(rs)}
        for key in ("val_last", "val_best", "test_selected", "test_last", "train_time_s", "images_per_s"):
            row[f"{key}_mean"], row[f"{key}_sd"] = _mean_sd([getattr(r, key) for r in rs])
        rows.append(row)
    return rows


def _pct(m: float | None, sd: float | None) -> str:
    if m is None:
        return "—"
    return f"{100 * m:.2f}" if sd is None else f"{100 * m:.2f} ± {100 * sd:.2f}"


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The results table in Markdown (accuracies in %, mean ± sd over seeds)."""
    head = (
        "| method | seeds | val acc, last epoch | val acc, best epoch | test acc (selected on val) "
        "| test acc, last epoch | train time (s) | images/s |\n|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        lines.append(
            f"| {r['method']} | {', '.join(map(str, r['seeds']))} | {_pct(r['val_last_mean'], r['val_last_sd'])} "
            f"| {_pct(r['val_best_mean'], r['val_best_sd'])} | {_pct(r['test_selected_mean'], r['test_selected_sd'])} "
            f"| {_pct(r['test_last_mean'], r['test_last_sd'])} | {r['train_time_s_mean']:.1f} "
            f"| {r['images_per_s_mean']:.0f} |"
        )
    return head + "\n".join(lines) + "\n"


def _accuracy_panel(ax: Any, results: Sequence[RunResult], rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Test accuracy per method as points: every seed's value, the mean, and ± sd only when there is
    a spread (two seeds or more). Points, not bars, so a y axis that does not start at 0 cannot
    exaggerate the differences. Returns the methods in order."""
    names = [str(r["method"]) for r in rows]
    for i, r in enumerate(rows):
        values = [100 * x.test_selected for x in results if x.method == r["method"]]
        ax.plot([i] * len(values), values, linestyle="none", marker=".", color="0.55", zorder=2)
        mean, sd = r["test_selected_mean"], r["test_selected_sd"]
        if mean is None:
            continue
        yerr = None if sd is None else 100 * sd
        ax.errorbar([i], [100 * mean], yerr=yerr, fmt="o", color="tab:blue", capsize=5, zorder=3)
        label = f"{100 * mean:.1f}" if sd is None else f"{100 * mean:.1f} ± {100 * sd:.1f}"
        ax.annotate(label, (i, 100 * mean), xytext=(8, 0), textcoords="offset points", va="center", fontsize="small")
    ax.set_xticks(range(len(names)), names, rotation=30)
    ax.set_xlim(-0.5, len(names) - 0.5 + 0.6)
    spread = any(r["test_selected_sd"] is not None for r in rows)
    ax.set_ylabel("test accuracy (%), model selected on val")
    ax.set_title("test accuracy per method: " + ("mean ± sd over seeds, dots: seeds" if spread else "one seed each"))
    return names


def _plot_png(results: Sequence[RunResult], rows: Sequence[Mapping[str, Any]], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = _accuracy_panel(ax1, results, rows)
    for i, method in enumerate(names):
        color = f"C{i % 10}"
        for j, r in enumerate(x for x in results if x.method == method):
            xs = [h["epoch"] for h in r.history]
            ys = [100 * h["val_acc"] if h["val_acc"] is not None else float("nan") for h in r.history]
            if all(math.isnan(y) for y in ys):
                xs = [h["epoch"] for h in r.history if h["test_acc"] is not None]
                ys = [100 * h["test_acc"] for h in r.history if h["test_acc"] is not None]
            ax2.plot(xs, ys, color=color, alpha=0.8, marker=".", label=method if j == 0 else None)
    ax2.xaxis.get_major_locator().set_params(integer=True)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("validation accuracy (%)")
    ax2.set_title("training curves")
    ax2.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_reports(
    out_dir: str | os.PathLike[str],
    results: Sequence[RunResult],
    meta: Mapping[str, Any],
    *,
    plot: bool = True,
    ctx: Context | None = None,
) -> dict[str, Path]:
    """Write ``results.json``, ``results.md`` and (``plot``) ``results.png`` atomically; return their paths.

    ``meta`` is recorded as is in the JSON (recipe, options, seeds, data, environment...). A
    SIGINT / SIGTERM while they are written stops before the next file (:class:`StopRequested`;
    ``ctx``'s ``handle_signals`` and world size say whether signals are handled, as in
    :func:`train_run`); ``--resume`` then writes them all from the finished checkpoints.

    Raises:
        OutputError: a report cannot be written (a full disk, a read-only directory...).
        StopRequested: a stop signal arrived.
    """
    handle = ctx.config.handle_signals and not ctx.distributed if ctx is not None else True
    held = _STOP.enter(handle)
    try:
        where = "while writing the reports (every run is finished and checkpointed)"
        _STOP.check(where)
        out = Path(out_dir)
        rows = summarise(results)
        table = markdown_table(rows)
        title = str(meta.get("recipe", "results"))
        doc = {"meta": dict(meta), "summary": rows, "runs": [r.to_json() for r in results]}
        paths = {"json": out / "results.json", "md": out / "results.md"}
        md = f"# {title}\n\n{meta.get('data', '')}\n\n{table}"
        png = _plot_png(results, rows, title) if plot else None
        files = [(paths["json"], _json_bytes(doc)), (paths["md"], md.encode())]
        if png is not None:
            paths["png"] = out / "results.png"
            files.append((paths["png"], png))
        for path, data in files:
            _STOP.check(where)
            atomic_write_bytes(path, data)
        return paths
    finally:
        if held:
            _STOP.exit()
