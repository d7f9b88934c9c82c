"""The one training loop of the reference trainers, and its results, checkpoints and reports.

A recipe describes *what* to train; this package does the rest the same way for every recipe.
It is built in phases, one module each, and every name below is importable from
``reference_trainers.engine``:

- :mod:`~reference_trainers.engine.context`: :class:`TrainConfig`, :class:`Context`,
  :func:`setup`, :func:`teardown`, :class:`RunData`, :class:`RunSpec`, :class:`RunResult`, :class:`TeacherCache`;
- :mod:`~reference_trainers.engine.step`: :class:`DistillStep`, the student side's base class;
- :mod:`~reference_trainers.engine.loop`: :func:`train_run` (start, :func:`restore`, then
  :func:`run_epoch` and :func:`evaluate_and_select` per epoch), :func:`evaluate`,
  :func:`teacher_cache`, :func:`check_ranks_agree`;
- :mod:`~reference_trainers.engine.checkpoint`: the typed records :class:`Checkpoint`,
  :class:`EpochProgress`, :class:`Best`, :func:`save_checkpoint`, :func:`load_checkpoint`,
  :func:`checkpoint_digest`;
- :mod:`~reference_trainers.engine.reports`: :func:`summarise`, :func:`markdown_table`,
  :func:`write_reports`, :func:`environment`;
- :mod:`~reference_trainers.engine.signals`: :class:`StopRequested`, :func:`stop_signals`;
- :mod:`~reference_trainers.engine.atomic`: :func:`atomic_write_bytes`, :func:`remove_stale_temps`.

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
6. ``teardown()``: leaves the process group that ``setup`` joined (barrier, then
   ``destroy_process_group``); without it a torchrun process can abort at exit.

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

from reference_trainers.engine.atomic import atomic_write_bytes, remove_stale_temps
from reference_trainers.engine.checkpoint import (
    CHECKPOINT_FORMAT,
    Best,
    Checkpoint,
    EpochProgress,
    checkpoint_digest,
    load_checkpoint,
    save_checkpoint,
)
from reference_trainers.engine.context import (
    BatchSource,
    Context,
    RunData,
    RunResult,
    RunSpec,
    TeacherCache,
    TrainConfig,
    setup,
    teardown,
)
from reference_trainers.engine.loop import (
    check_ranks_agree,
    evaluate,
    evaluate_and_select,
    restore,
    run_epoch,
    teacher_cache,
    train_run,
)
from reference_trainers.engine.reports import environment, markdown_table, summarise, write_reports
from reference_trainers.engine.signals import StopRequested, stop_signals
from reference_trainers.engine.step import DistillStep

__all__ = [
    "CHECKPOINT_FORMAT",
    "BatchSource",
    "Best",
    "Checkpoint",
    "Context",
    "DistillStep",
    "EpochProgress",
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
    "evaluate_and_select",
    "load_checkpoint",
    "markdown_table",
    "remove_stale_temps",
    "restore",
    "run_epoch",
    "save_checkpoint",
    "setup",
    "stop_signals",
    "summarise",
    "teacher_cache",
    "teardown",
    "train_run",
    "write_reports",
]
