"""The loop: :func:`train_run` in phases (start, :func:`restore`, one :func:`run_epoch` after the
other with :func:`evaluate_and_select`), :func:`evaluate`, and the teacher cache
(:func:`teacher_cache`); see :mod:`reference_trainers.engine` for what a run does."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

import kdloss
from reference_trainers.data import Batch, TensorAugment
from reference_trainers.engine import checkpoint
from reference_trainers.engine.atomic import remove_stale_temps
from reference_trainers.engine.checkpoint import Best, Checkpoint, EpochProgress, rng_state, set_rng_state
from reference_trainers.engine.context import BatchSource, Context, RunData, RunResult, RunSpec, TeacherCache
from reference_trainers.engine.signals import STOP, StopRequested, guard, why
from reference_trainers.engine.step import DistillStep
from reference_trainers.errors import CheckpointError, TrainerError, TrainingDiverged

__all__ = [
    "check_ranks_agree",
    "evaluate",
    "evaluate_and_select",
    "restore",
    "run_epoch",
    "seed_everything",
    "teacher_cache",
    "train_run",
]


def seed_everything(seed: int) -> None:
    """Seed python's and torch's generators (the trainers use no numpy randomness)."""
    random.seed(seed)
    torch.manual_seed(seed)


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
    with guard(ctx):
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
            STOP.check("while caching the teacher's outputs (the teacher's checkpoint is written)")
            out = teacher(augment.normalise(b.images))
            for k, v in out.items():
                if k not in cache:
                    cache[k] = torch.empty((n, *v.shape[1:]), dtype=v.dtype, device=ctx.device)
                cache[k][b.index] = v
    STOP.check("while caching the teacher's outputs (the teacher's checkpoint is written)")
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


# --------------------------------------------------------------------------------------------- a run


@dataclass
class _Run:
    """One (method, seed) in progress: what its phases read and update."""

    ctx: Context
    spec: RunSpec
    data: RunData
    path: Path  # its checkpoint
    step: DistillStep
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    signature: dict[str, Any]
    model: nn.Module | None = None  # the step, in DDP under torchrun (set after the restore)
    history: list[dict[str, Any]] = field(default_factory=list)
    best: Best = field(default_factory=Best)
    start_epoch: int = 0
    train_time: float = 0.0
    images_seen: int = 0
    run_steps: int = 0
    resume_rng: dict[str, Any] | None = None  # restored when the first resumed epoch starts
    partial: EpochProgress | None = None  # the progress of an epoch stopped part-way
    cache: dict[str, Tensor] | None = None
    cache_time: float | None = None
    unsynced: set[str] = field(default_factory=set)

    def save(self, epochs_done: int, done: bool, progress: EpochProgress | None) -> None:
        """Write this run's checkpoint (rank 0): after ``epochs_done`` epochs, plus ``progress`` inside the next."""
        if not self.ctx.is_main:
            return
        record = Checkpoint(
            method=self.spec.method,
            seed=self.spec.seed,
            signature=self.signature,
            epoch=epochs_done,
            epochs=self.spec.epochs,
            done=done,
            model=self.step.state_dict(),
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict() if self.scheduler is not None else None,
            rng=rng_state(),
            history=self.history,
            best=self.best,
            train_time_s=self.train_time,
            images=self.images_seen,
            run_steps=self.run_steps,
            teacher_cache_s=self.cache_time,
            torch=str(torch.__version__),
            partial=progress,
        )
        checkpoint.save_checkpoint(record.to_dict(), self.path)


def train_run(ctx: Context, spec: RunSpec, data: RunData) -> RunResult:
    """Train one (method, seed); see :mod:`reference_trainers.engine` for everything it does.

    Raises:
        CheckpointError: resuming from a checkpoint of another method, seed or model.
        StopRequested: after ``config.stop_after_epoch`` (the checkpoint of that epoch is written).
    """
    with guard(ctx):
        return _train_run(ctx, spec, data)


def _train_run(ctx: Context, spec: RunSpec, data: RunData) -> RunResult:
    run = _start(ctx, spec, data)
    if restore(run):
        return _result(run)
    _wrap(run)
    _teacher_outputs(run)
    for epoch in range(run.start_epoch, spec.epochs):
        record, stop_at_epoch_end = run_epoch(run, epoch)
        evaluate_and_select(run, epoch, record)
        _end_epoch(run, epoch, stop_at_epoch_end)
    if ctx.distributed:
        check_ranks_agree(ctx, run.step)
        ctx.log(f"[{spec.method} seed {spec.seed}] all {ctx.world_size} ranks hold the same weights")
    STOP.check(f"after the last epoch of {spec.method!r} seed {spec.seed} (finished, checkpoint written)")
    return _result(run)


def _start(ctx: Context, spec: RunSpec, data: RunData) -> _Run:
    """Check the run, seed, build the step on the device with its optimiser and scheduler."""
    if spec.epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {spec.epochs}")
    path = Path(ctx.config.out_dir) / "checkpoints" / f"{spec.method}-seed{spec.seed}.pt"
    STOP.check(f"before {spec.method!r} seed {spec.seed} started")
    if path.exists() and not path.is_file():
        raise CheckpointError(
            f"{str(path)!r}, where this run's checkpoint goes, is not a file (a directory?): "
            "remove it or choose another --out"
        )
    if ctx.is_main:
        for stale in remove_stale_temps(path):  # left by a write that was killed
            ctx.log(f"removed {stale}, a temp file of an interrupted checkpoint write")
    seed_everything(spec.seed)
    step = spec.build()
    if not isinstance(step, DistillStep):
        raise TypeError(f"RunSpec.build must return a DistillStep, got {type(step).__name__}")
    STOP.check(f"before {spec.method!r} seed {spec.seed} started (its model built)")
    step.to(ctx.device)
    if ctx.use_channels_last:
        step.to(memory_format=torch.channels_last)
    params = [p for p in step.parameters() if p.requires_grad]
    optimizer = spec.optimizer(params)
    kdloss.check_optimizer(optimizer, step)
    scheduler = spec.scheduler(optimizer) if spec.scheduler is not None else None
    return _Run(ctx, spec, data, path, step, optimizer, scheduler, step.signature())


def restore(run: _Run) -> bool:
    """With ``RunSpec.resume`` and a checkpoint of this run: load every state from it. Returns
    whether the run was finished (then nothing is left to train).

    Raises:
        CheckpointError: a checkpoint of another method, seed, model or number of epochs, or one
            whose states do not load (it is left as it was).
    """
    spec, path = run.spec, run.path
    if not (spec.resume and path.is_file()):
        return False
    ck = Checkpoint.from_dict(checkpoint.load_checkpoint(path), path)
    signature = run.signature
    if (ck.method, ck.seed) != (spec.method, spec.seed) or ck.signature != signature:
        got = ck.signature
        mismatched = sorted(set(map(str, got.get("shapes", {}).items())) ^ set(map(str, signature["shapes"].items())))
        raise CheckpointError(
            f"checkpoint {str(path)!r} was written for method {ck.method!r} seed {ck.seed} "
            f"({got.get('class')} / {got.get('student')}), but this run is {spec.method!r} seed {spec.seed} "
            f"({signature['class']} / {signature['student']}); differing state: {mismatched[:4]}"
        )
    if int(ck.epochs) != spec.epochs:
        raise CheckpointError(
            f"checkpoint {str(path)!r} belongs to a run of {ck.epochs} epochs, this run asks for "
            f"{spec.epochs}; resume with the same --epochs, or use another --out / drop --resume to start over"
        )
    try:
        run.step.load_state_dict(ck.model)
        run.optimizer.load_state_dict(ck.optimizer)
        if run.scheduler is not None and ck.scheduler is not None:
            run.scheduler.load_state_dict(ck.scheduler)
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
        raise CheckpointError(
            f"checkpoint {str(path)!r} cannot be resumed from ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); it was not changed: remove it or choose another --out"
        ) from e
    run.history, run.best = ck.history, ck.best
    run.start_epoch, run.train_time, run.images_seen = int(ck.epoch), float(ck.train_time_s), int(ck.images)
    run.run_steps, run.resume_rng, run.partial = ck.run_steps, ck.rng, ck.partial
    where = f"after epoch {run.start_epoch}"
    if run.partial is not None:
        where = f"at step {run.partial.steps} of epoch {run.start_epoch + 1}"
    run.ctx.log(f"[{spec.method} seed {spec.seed}] resumed from {path} {where}")
    if ck.done:
        run.cache_time = ck.teacher_cache_s
    return ck.done


def _wrap(run: _Run) -> None:
    """``compile()`` the student in place when asked; wrap the step in DDP under torchrun."""
    ctx, step = run.ctx, run.step
    if ctx.config.compile:
        step.student.compile()
    run.model = step
    run.unsynced = set(step.ddp_unsynced_buffers())
    if ctx.distributed:
        if run.unsynced:  # DDP neither broadcasts these buffers from rank 0 nor checks them
            ddp_cls = nn.parallel.DistributedDataParallel
            ddp_cls._set_params_and_buffers_to_ignore_for_model(step, sorted(run.unsynced))  # type: ignore[no-untyped-call]
        run.model = nn.parallel.DistributedDataParallel(
            step, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None
        )


def _teacher_outputs(run: _Run) -> None:
    """Put the teacher side on the device, and take (or compute) its cached outputs when valid."""
    teacher, cfg = run.spec.teacher, run.ctx.config
    if teacher is None:
        return
    _prepare_teacher(run.ctx, teacher)
    tc = run.spec.teacher_cache
    if tc is not None and tc.teacher is not teacher:
        raise ValueError("RunSpec.teacher_cache was computed from another teacher side than RunSpec.teacher")
    if tc is None and cfg.cache_teacher:
        tc = teacher_cache(run.ctx, teacher, run.data)
    if tc is not None and cfg.cache_teacher:
        run.cache, run.cache_time = tc.outputs, tc.seconds


def run_epoch(run: _Run, epoch: int) -> tuple[dict[str, Any], bool]:
    """Train one epoch (continuing a stopped one where a resume left it); return its history record
    (loss parts, lr, time, images; accuracies not yet measured) and whether ``stop_after_step`` fell
    on its last step.

    Writes the mid-epoch checkpoints (``checkpoint_every``, a stop signal, ``stop_after_step``).

    Raises:
        StopRequested: a stop inside the epoch (its checkpoint is written).
        CheckpointError: a resumed epoch whose batches differ from the stopped one's.
    """
    ctx, spec, data, step, cfg = run.ctx, run.spec, run.data, run.step, run.ctx.config
    model = run.model if run.model is not None else step
    optimizer, teacher, cache = run.optimizer, spec.teacher, run.cache
    signals = STOP  # its handlers are held by train_run's guard
    aug_gen_device = ctx.device if ctx.device.type == "cuda" else torch.device("cpu")
    model.train()
    resumed_here = run.partial if epoch == run.start_epoch else None
    if epoch == run.start_epoch and run.resume_rng is not None:
        set_rng_state(resumed_here.rng_epoch_start if resumed_here is not None else run.resume_rng)
    rng_epoch_start = rng_state()  # what a mid-epoch checkpoint needs to rebuild this epoch's batches
    aug_gen = torch.Generator(device=aug_gen_device).manual_seed(spec.seed * 1_000_003 + epoch + 7)
    n_batches = len(data.train) if cfg.max_batches is None else min(len(data.train), cfg.max_batches)
    batches = _limited(data.train.batches(epoch), cfg.max_batches)
    sums: dict[str, Tensor] = {}
    seen = steps = 0
    elapsed = 0.0
    stop_at_epoch_end = False  # stop_after_step fell on the epoch's last step
    if resumed_here is not None:
        if resumed_here.n_batches != n_batches:
            raise CheckpointError(
                f"checkpoint {str(run.path)!r} stopped at step {resumed_here.steps} of an epoch of "
                f"{resumed_here.n_batches} batches, but this run's epochs have {n_batches}: resume with "
                "the same data, --batch-size and --max-batches, or drop --resume to start over"
            )
        for _ in range(resumed_here.steps):  # the batches the stopped run had trained on
            next(batches)
        aug_gen.set_state(resumed_here.aug_gen)
        sums = {k: v.to(ctx.device) for k, v in resumed_here.sums.items()}
        seen, steps = resumed_here.seen, resumed_here.steps
        elapsed = resumed_here.time_s
        set_rng_state(resumed_here.rng)
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
        run.run_steps += 1
        bar.update(1)
        if (i + 1) % update_every == 0 or i + 1 == n_batches:
            elapsed = time.perf_counter() - t0
            img_s = f"{seen * ctx.world_size / elapsed:.0f}"
            bar.set_postfix(loss=f"{float(out.parts['total']):.4f}", img_s=img_s)
        stop_step = cfg.stop_after_step is not None and run.run_steps == cfg.stop_after_step
        if steps == n_batches:  # the epoch's end writes its own checkpoint, and stops there if asked
            stop_at_epoch_end = stop_step
            continue
        stop = stop_step or signals.requested is not None
        if stop or (cfg.checkpoint_every is not None and steps % cfg.checkpoint_every == 0):
            local = dict(zip(sums, (torch.stack(list(sums.values())) / steps).tolist()))  # one host read
            _check_finite(run, epoch, local, f"step {steps} of ", rank_local=True)
            run.save(
                epoch,
                False,
                EpochProgress(
                    steps=steps,
                    n_batches=n_batches,
                    seen=seen,
                    sums={k: v.detach().cpu() for k, v in sums.items()},
                    time_s=time.perf_counter() - t0,
                    aug_gen=aug_gen.get_state(),
                    rng=rng_state(),
                    rng_epoch_start=rng_epoch_start,
                ),
            )
            ctx.barrier()
        if stop:
            bar.close()
            raise StopRequested(
                f"stopped at step {steps} of epoch {epoch + 1} of {spec.method!r} seed {spec.seed} "
                f"(checkpoint {str(run.path)!r} written){why(signals)}; continue with --resume"
            )
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
    epoch_time = time.perf_counter() - t0
    bar.close()
    if run.scheduler is not None:
        run.scheduler.step()
    if ctx.distributed:  # DDP syncs buffers (BatchNorm statistics) before each forward: do it once more
        for name, buf in step.named_buffers():
            if name not in run.unsynced:  # those the step keeps identical itself (CRD's banks)
                dist.broadcast(buf, 0)
    if steps == 0:
        raise TrainerError(f"{spec.method!r}: the training split gave no batch (empty, or smaller than one batch?)")
    means = {k: float(v) / steps for k, v in sums.items()}
    if ctx.distributed:
        vec = torch.tensor([means[k] for k in sorted(means)], dtype=torch.float64, device=ctx.device)
        dist.all_reduce(vec)
        means = {k: float(v) / ctx.world_size for k, v in zip(sorted(means), vec.tolist())}
    _check_finite(run, epoch, means, "", rank_local=False)  # (means over all ranks: the same everywhere)
    global_seen = seen * ctx.world_size
    run.train_time += epoch_time
    run.images_seen += global_seen
    record: dict[str, Any] = {
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
    return record, stop_at_epoch_end


def _check_finite(run: _Run, epoch: int, means: dict[str, float], where: str, *, rank_local: bool) -> None:
    """Raise :class:`TrainingDiverged` when a mean loss part so far is NaN or infinite, before any
    checkpoint of the diverged weights is written (so ``--resume`` never continues from one).

    Called where the loop reads the losses anyway (a checkpoint, the epoch's end). ``rank_local``:
    ``means`` are this rank's only, so under DDP the ranks first agree (one all-reduce of a flag).
    """
    ctx, spec = run.ctx, run.spec
    diverged = not all(math.isfinite(v) for v in means.values())
    if rank_local and ctx.distributed:
        flag = torch.tensor([float(diverged)], dtype=torch.float64, device=ctx.device)
        dist.all_reduce(flag)
        diverged = bool(flag.item())
    if not diverged:
        return
    parts = ", ".join(f"{k} {v:.4g}" for k, v in sorted(means.items()))
    whose = " on this rank" if rank_local and ctx.distributed else ""
    kept = (
        f"the last finite checkpoint {str(run.path)!r} is kept"
        if run.path.exists()
        else "no checkpoint of this run was written"
    )
    raise TrainingDiverged(
        f"{spec.method!r} seed {spec.seed} diverged by {where}epoch {epoch + 1}: the mean training loss is "
        f"not finite ({parts}{whose}); {kept}. Lower the learning rate (--lr) or check the data, then start "
        "this run again"
    )


def evaluate_and_select(run: _Run, epoch: int, record: dict[str, Any]) -> None:
    """Measure the epoch's validation accuracy; the test accuracy only at a new best validation epoch
    (ties keep the earlier one) and at the last epoch, so the reported model is selected on
    validation, never on test. Appends ``record`` to the history and logs it."""
    ctx, spec, data, step = run.ctx, run.spec, run.data, run.step
    last = epoch + 1 == spec.epochs
    if data.val is not None:
        record["val_acc"] = evaluate(ctx, step.student, data.val, data.eval_augment)
        if run.best.val is None or record["val_acc"] > run.best.val:
            run.best = Best(val=record["val_acc"], epoch=epoch + 1, test=None)
    if (data.val is not None and run.best.epoch == epoch + 1) or last:
        record["test_acc"] = evaluate(ctx, step.student, data.test, data.eval_augment)
        if run.best.epoch == epoch + 1:
            run.best.test = record["test_acc"]
    run.history.append(record)
    msg = f"[{spec.method} seed {spec.seed}] epoch {epoch + 1}/{spec.epochs} loss {record['loss']:.4f}"
    if record["val_acc"] is not None:
        msg += f" val {100 * record['val_acc']:.2f}%"
    if record["test_acc"] is not None:
        msg += f" test {100 * record['test_acc']:.2f}%"
    ctx.log(msg + f" ({record['images_per_s']:.0f} img/s)")


def _end_epoch(run: _Run, epoch: int, stop_at_epoch_end: bool) -> None:
    """The epoch's checkpoint, then a stop if one was asked for (not after the last epoch)."""
    ctx, spec, cfg = run.ctx, run.spec, run.ctx.config
    last = epoch + 1 == spec.epochs
    run.save(epoch + 1, last, None)
    ctx.barrier()
    if cfg.stop_after_epoch is not None and epoch + 1 == cfg.stop_after_epoch and not last:
        raise StopRequested(
            f"stopped after epoch {epoch + 1} of {spec.method!r} seed {spec.seed} as asked "
            f"(--stop-after-epoch); continue with --resume"
        )
    if (stop_at_epoch_end or STOP.requested is not None) and not last:
        raise StopRequested(
            f"stopped after epoch {epoch + 1} of {spec.method!r} seed {spec.seed} (checkpoint "
            f"{str(run.path)!r} written){why(STOP)}; continue with --resume"
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


def _result(run: _Run) -> RunResult:
    history, best, train_time = run.history, run.best, run.train_time
    last = history[-1]
    has_val = best.val is not None
    selected: Any = best.test if has_val else last["test_acc"]  # the best epoch's test is always measured
    return RunResult(
        method=run.spec.method,
        seed=run.spec.seed,
        epochs=len(history),
        history=history,
        val_last=last["val_acc"],
        val_best=best.val,
        best_epoch=int(best.epoch) if has_val else len(history),
        test_selected=float(selected),
        test_last=float(last["test_acc"]),
        train_time_s=train_time,
        images_per_s=run.images_seen / train_time if train_time > 0 else float("nan"),
        teacher_cache_s=run.cache_time,
        step=run.step,
    )
