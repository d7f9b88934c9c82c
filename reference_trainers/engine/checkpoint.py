"""Checkpoints: the typed records (:class:`Checkpoint`, :class:`EpochProgress`, :class:`Best`), their
checksum, and the safe save and load (``weights_only``, verified, atomic).

The format is ``reference_trainers.checkpoint/2``: a dict of tensors, numbers, strings, lists and
dicts (loadable with ``torch.load(weights_only=True)``) plus ``"checksum"``, a SHA-256 over every
key, value and tensor byte (:func:`checkpoint_digest`).
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from reference_trainers.engine import atomic
from reference_trainers.errors import CheckpointError

__all__ = [
    "CHECKPOINT_FORMAT",
    "Best",
    "Checkpoint",
    "EpochProgress",
    "checkpoint_digest",
    "load_checkpoint",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]

_FORMAT_NAME = "reference_trainers.checkpoint/"
CHECKPOINT_FORMAT = _FORMAT_NAME + "2"


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
    atomic.atomic_write_bytes(path, data)


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


def rng_state() -> dict[str, Any]:
    """The random states a resume restores: python's, torch's CPU and CUDA generators (numpy is not used)."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state(), "cuda": None}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]  # unannotated in torch
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (a checkpoint's ``rng``)."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


@dataclass
class Best:
    """The epoch selected on validation so far: its validation and test accuracies (``None``: not measured)."""

    val: float | None = None
    epoch: int = 0
    test: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint's ``best`` entry (keys ``val``, ``epoch``, ``test``, in this order)."""
        return {"val": self.val, "epoch": self.epoch, "test": self.test}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Best:
        return cls(val=d["val"], epoch=d["epoch"], test=d["test"])


@dataclass
class EpochProgress:
    """How far an epoch stopped part-way got (a mid-epoch checkpoint's ``partial`` entry).

    Attributes:
        steps: training steps done in the epoch; ``n_batches``: the epoch's batches (a resume
            with other data, batch size or ``--max-batches`` is refused).
        seen: images trained on (this rank); ``sums``: the running sums of the loss parts (CPU).
        time_s: the epoch's training time so far.
        aug_gen: the augmentation generator's state; ``rng``: the random states at the stop;
            ``rng_epoch_start``: at the epoch's start (to rebuild its batch order).
    """

    steps: int
    n_batches: int
    seen: int
    sums: dict[str, Tensor]
    time_s: float
    aug_gen: Tensor
    rng: dict[str, Any]
    rng_epoch_start: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "n_batches": self.n_batches,
            "seen": self.seen,
            "sums": self.sums,
            "time_s": self.time_s,
            "aug_gen": self.aug_gen,
            "rng": self.rng,
            "rng_epoch_start": self.rng_epoch_start,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EpochProgress:
        return cls(
            steps=int(d["steps"]),
            n_batches=int(d["n_batches"]),
            seen=int(d["seen"]),
            sums=dict(d["sums"]),
            time_s=float(d["time_s"]),
            aug_gen=d["aug_gen"],
            rng=d["rng"],
            rng_epoch_start=d["rng_epoch_start"],
        )


@dataclass
class Checkpoint:
    """A run's checkpoint, typed: what :func:`save_checkpoint` writes and :func:`load_checkpoint` reads.

    :meth:`to_dict` gives the format :data:`CHECKPOINT_FORMAT` (``reference_trainers.checkpoint/2``)
    key for key and in the same order as every earlier version wrote it, so checkpoints written
    before this record existed load, resume and keep their checksums.

    Attributes:
        method, seed: the run; ``signature``: :meth:`DistillStep.signature` of its step.
        epoch: epochs done; ``epochs``: the run's epochs; ``done``: the run finished.
        model, optimizer, scheduler: the state dicts (``scheduler`` None without one).
        rng: the random states (:func:`rng_state`) after ``epoch`` epochs.
        history: one record per epoch done (see :class:`~reference_trainers.engine.RunResult`).
        best: the epoch selected on validation so far.
        train_time_s, images, run_steps: training time, images and steps so far.
        teacher_cache_s: seconds the teacher cache took (None without one).
        torch: the torch version that wrote it.
        partial: the progress inside epoch ``epoch + 1`` when it stopped part-way, else None.
    """

    method: str
    seed: int
    signature: dict[str, Any]
    epoch: int
    epochs: int
    done: bool
    model: dict[str, Any]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any] | None
    rng: dict[str, Any]
    history: list[dict[str, Any]]
    best: Best
    train_time_s: float
    images: int
    run_steps: int = 0
    teacher_cache_s: float | None = None
    torch: str = field(default_factory=lambda: str(torch.__version__))
    partial: EpochProgress | None = None

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint as saved (without the checksum, which :func:`save_checkpoint` adds)."""
        state: dict[str, Any] = {
            "format": CHECKPOINT_FORMAT,
            "method": self.method,
            "seed": self.seed,
            "signature": self.signature,
            "epoch": self.epoch,
            "epochs": self.epochs,
            "done": self.done,
            "model": self.model,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "rng": self.rng,
            "history": self.history,
            "best": self.best.to_dict(),
            "train_time_s": self.train_time_s,
            "images": self.images,
            "run_steps": self.run_steps,
            "teacher_cache_s": self.teacher_cache_s,
            "torch": self.torch,
        }
        if self.partial is not None:
            state["partial"] = self.partial.to_dict()
        return state

    @classmethod
    def from_dict(cls, ck: Mapping[str, Any], path: str | os.PathLike[str] = "<checkpoint>") -> Checkpoint:
        """The record of a loaded checkpoint (:func:`load_checkpoint`'s dict).

        Raises:
            CheckpointError: a key of a run's checkpoint is missing or of the wrong type, or the
                ``partial`` or ``best`` entry is malformed: it is not a run's checkpoint (or damaged).
        """
        shown = str(path)
        for key, kind in _RUN_CHECKPOINT_KEYS.items():
            if key not in ck:
                raise CheckpointError(f"checkpoint {shown!r} lacks {key!r}: it is not a run's checkpoint (or damaged)")
            if not isinstance(ck[key], kind):
                raise CheckpointError(
                    f"checkpoint {shown!r} has {key!r} of type {type(ck[key]).__name__}: it is not a run's checkpoint"
                )
        try:
            partial = ck.get("partial")
            return cls(
                method=ck["method"],
                seed=ck["seed"],
                signature=ck["signature"],
                epoch=ck["epoch"],
                epochs=ck["epochs"],
                done=ck["done"],
                model=ck["model"],
                optimizer=ck["optimizer"],
                scheduler=ck["scheduler"],
                rng=ck["rng"],
                history=list(ck["history"]),
                best=Best.from_dict(ck["best"]),
                train_time_s=ck["train_time_s"],
                images=ck["images"],
                run_steps=int(ck.get("run_steps", 0)),
                teacher_cache_s=ck.get("teacher_cache_s"),
                torch=str(ck.get("torch", "")),
                partial=EpochProgress.from_dict(partial) if partial is not None else None,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(
                f"checkpoint {shown!r} cannot be resumed from ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); it was not changed: remove it or choose another --out"
            ) from e
