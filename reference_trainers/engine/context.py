"""What a run is given: the configuration (:class:`TrainConfig`), the process's place (:class:`Context`,
:func:`setup`), the data (:class:`RunData`), one (method, seed) to train (:class:`RunSpec`), and what
it gives back (:class:`RunResult`, :class:`TeacherCache`)."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn

from reference_trainers.data import Batch, TensorAugment
from reference_trainers.engine.step import DistillStep
from reference_trainers.errors import TrainerError

__all__ = [
    "BatchSource",
    "Context",
    "RunData",
    "RunResult",
    "RunSpec",
    "TeacherCache",
    "TrainConfig",
    "setup",
    "teardown",
]

# True while this process holds a process group that :func:`setup` created (and so must destroy).
_OWNS_GROUP = False


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
        global _OWNS_GROUP
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        _OWNS_GROUP = True
    return Context(config=config, device=device, rank=rank, world_size=world)


def teardown(*, clean: bool = True) -> None:
    """Leave the process group that :func:`setup` joined (a no-op otherwise).

    A process that exits while still holding a gloo or NCCL group can abort at interpreter
    shutdown ("terminate called without an active exception", SIGABRT) because the group's
    worker threads outlive Python; call this once at the end of the program.

    Args:
        clean: the run ended normally on this rank; then every rank first meets at a barrier,
            so none tears its connections down while a peer still uses them. Pass ``False``
            after an error or a stop, where the peers may never arrive.
    """
    global _OWNS_GROUP
    if not (_OWNS_GROUP and dist.is_initialized()):
        return
    try:
        if clean:
            dist.barrier()
    finally:
        dist.destroy_process_group()
        _OWNS_GROUP = False


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
