"""Methods over intermediate heads or exits: ``dih``, ``mhkd``, ``tofd``, ``self-distill`` (kdloss's ``cohort`` family).

================  =============================================================================
``dih``           DIH (Asadian et al., 2021): heads fine-tuned on the frozen teacher
                  (``kdloss.IntermediateHeads``, ``finetune_heads``, ``CohortOptions.head_epochs``),
                  then the cohort teaches (``kdloss.CohortLoss``, authors' form)
``mhkd``          ``kdloss.IntermediateHeads(head="mhkd")`` fine-tuned on the frozen teacher; the
                  same heads on the student train with it: ``MultiHeadKDLoss(T, alpha=alpha,
                  weights=[0.5, ..., 0.5, 1])`` over every head pair (weight 0.5, the DIH authors'
                  ``mhkd_beta``) and the final classifiers (weight 1); ``alpha`` is the KD weight
``tofd``          as ``mhkd`` with ``head="tofd"`` and ``TOFDLoss(T, alpha=alpha, beta=0.05,
                  gamma=1e-3)``: the heads' features (student side through ``kdloss.adapter_for``
                  adapters) and the adapters' orthogonality (Zhang et al., NeurIPS 2020)
``self-distill``  no teacher: early-exit classifiers on every stage but the last, each trained with
                  ``ce_weight * CE + kd_weight * KL_T^2`` from the student's own final output
                  (``kdloss.SelfDistillationLoss``; Zhang et al., ICCV 2019); needs ``ce_weight +
                  kd_weight = 1``
================  =============================================================================

The teacher's fine-tuned heads are kept in ``MethodSetup.shared`` for the recipe's other seeds;
``mhkd`` and ``tofd`` also save them next to the checkpoints (``MethodSetup.checkpoint_dir``), so
that a resumed run reads the same heads (``MethodSetup.resume``). The file is written and read
like the engine's checkpoints (:func:`~reference_trainers.engine.save_checkpoint`,
:func:`~reference_trainers.engine.load_checkpoint`: atomic, ``weights_only``, a checksum); a
damaged file, or one that holds other heads, is refused with a one-line
:class:`~reference_trainers.errors.CheckpointError`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

import kdloss
from reference_trainers.engine import CHECKPOINT_FORMAT, DistillStep, load_checkpoint, save_checkpoint
from reference_trainers.errors import CheckpointError, TrainerError
from reference_trainers.methods.common import module_device, shapes
from reference_trainers.methods.registry import Built, MethodSetup
from reference_trainers.methods.steps import CohortStep, HeadsStep, HeadsTeacher, SelfDistillStep
from reference_trainers.models import head_paths, model_spec, stage_paths

__all__ = ["HEADS_KIND", "load_heads", "make_dih", "make_heads", "make_self_distill", "save_heads", "teacher_heads"]

HeadKind = Literal["mhkd", "tofd"]


def _heads_kwargs(name: str, head: str) -> dict[str, Any]:
    kw: dict[str, Any] = {"head": head, "feature_path": model_spec(name).feature_path}
    if head == "tofd":
        kw["stages"] = stage_paths(name)
    return kw


def _head_paths(name: str, head: str) -> list[str]:
    paths = head_paths(name)
    # A TOFD head re-instantiates the stages after its own; on the last stage there are none.
    return paths[:-1] if head == "tofd" and paths and paths[-1] == stage_paths(name)[-1] else paths


HEADS_KIND = "teacher-heads"
"""The ``kind`` of a saved heads file (a checkpoint of the engine's format)."""


def save_heads(path: Path, heads: nn.Module, head: str, teacher: str) -> None:
    """Save the fine-tuned ``heads`` of kind ``head`` on the model ``teacher`` as a verified checkpoint
    (:func:`~reference_trainers.engine.save_checkpoint`: a checksum, written atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"format": CHECKPOINT_FORMAT, "kind": HEADS_KIND, "head": head, "teacher": teacher}
    save_checkpoint({**state, "heads": heads.state_dict()}, path)


def load_heads(path: Path, heads: nn.Module, head: str, teacher: str) -> None:
    """Load into ``heads`` what :func:`save_heads` wrote for the same ``head`` and ``teacher``.

    Raises:
        CheckpointError: the file is missing, damaged (its checksum), unsafe, not a heads file,
            holds the heads of another kind or teacher, or does not fit ``heads``.
    """
    try:
        ck = load_checkpoint(path)
    except CheckpointError as e:
        raise CheckpointError(f"the saved {head} teacher heads (delete the file to fine-tune them again): {e}") from e
    shown = str(path)
    if ck.get("kind") != HEADS_KIND or not isinstance(ck.get("heads"), dict):
        raise CheckpointError(
            f"{shown!r} is not a file of teacher heads (kind {ck.get('kind')!r}): remove it to fine-tune them again"
        )
    if (ck.get("head"), ck.get("teacher")) != (head, teacher):
        raise CheckpointError(
            f"{shown!r} holds the {ck.get('head')} heads of {ck.get('teacher')}, not the {head} heads of {teacher}"
        )
    try:
        heads.load_state_dict(ck["heads"])
    except RuntimeError as e:
        raise CheckpointError(f"the teacher heads in {shown!r} do not fit: {str(e).splitlines()[0]}") from e


def teacher_heads(setup: MethodSetup, head: str) -> nn.Module:
    """The teacher's :class:`kdloss.IntermediateHeads` of kind ``head`` (``"dih"``, ``"mhkd"``, ``"tofd"``),
    fine-tuned once per recipe run (kept in ``setup.shared``) on the frozen teacher.

    ``mhkd`` and ``tofd`` save them in ``setup.checkpoint_dir`` and, with ``setup.resume``, read them
    back instead of fine-tuning again. Under DDP every rank takes rank 0's heads.

    Raises:
        TrainerError: the recipe gave no training batches to fine-tune on.
        CheckpointError: the saved heads cannot be read back (:func:`load_heads`).
    """
    dih = head == "dih"
    key = f"{head}-heads/{setup.teacher}/{id(setup.teacher_model)}"
    cached: nn.Module | None = setup.shared.get(key)
    if cached is not None:
        return cached
    if setup.train_batches is None:
        raise TrainerError(f"method {head!r} needs the recipe's training batches to fine-tune the teacher's heads")
    model = setup.teacher_model.requires_grad_(False).eval()
    device = module_device(model)
    example = torch.zeros(2, 3, 32, 32, device=device)
    paths = head_paths(setup.teacher) if dih else _head_paths(setup.teacher, head)
    kwargs = {} if dih else _heads_kwargs(setup.teacher, head)
    heads = kdloss.IntermediateHeads(model, paths, setup.num_classes, example_input=example, **kwargs).to(device)
    epochs = setup.cohort.head_epochs
    log = setup.log
    # The fine-tuned heads are saved next to the checkpoints, so that a resumed student run reads
    # the same teacher heads as before the interruption (--resume loads them, no fine-tuning).
    saved = None
    if not dih and setup.checkpoint_dir is not None:
        saved = setup.checkpoint_dir / f"{head}-teacher-heads-{setup.teacher}.pt"
    if saved is not None and setup.resume and saved.is_file():
        load_heads(saved, heads, head, setup.teacher)
        if log is not None:
            log(f"{head.upper()}: teacher heads loaded from {saved}")
    else:
        result = kdloss.finetune_heads(heads, setup.train_batches, epochs=epochs, lr=1e-3)
        if log is not None:
            losses = ", ".join(f"{x:.3f}" for x in result.head_losses)
            if dih:
                log(
                    f"DIH: {len(result.head_losses)} heads on {setup.teacher} fine-tuned for {epochs} epochs "
                    f"(last-epoch CE per head: {losses}); backbone unchanged: {result.backbone_unchanged}"
                )
            else:
                log(f"{head.upper()}: {len(result.head_losses)} {head} heads on {setup.teacher} fine-tuned ({losses})")
        if saved is not None:
            save_heads(saved, heads, head, setup.teacher)
    if torch.distributed.is_initialized():  # every rank saw its own shard (or rank 0 read the file)
        for t in [*heads.parameters(), *heads.buffers()]:
            torch.distributed.broadcast(t.data, 0)
    setup.shared[key] = heads
    return heads


def make_dih(setup: MethodSetup) -> Built:
    """``dih``: :class:`~reference_trainers.methods.steps.CohortStep` over the teacher's fine-tuned cohort."""
    t_side = HeadsTeacher(setup.teacher_model, teacher_heads(setup, "dih"), layout="cohort")

    def build() -> DistillStep:
        loss = kdloss.CohortLoss(setup.temperature, alpha=setup.kd_weight, form="authors")
        return CohortStep(setup.build_student(), loss)

    return Built(build, t_side)


def make_heads(head: HeadKind) -> Callable[[MethodSetup], Built]:
    """The ``make`` of ``mhkd`` or ``tofd``: paired heads on teacher and student (a ``HeadsStep``)."""

    def make(setup: MethodSetup) -> Built:
        t_heads = teacher_heads(setup, head)
        if len(_head_paths(setup.student, head)) != len(_head_paths(setup.teacher, head)):
            raise TrainerError(
                f"{head} pairs heads one to one: {setup.student} has {_head_paths(setup.student, head)}, "
                f"{setup.teacher} {_head_paths(setup.teacher, head)}"
            )
        device = module_device(setup.teacher_model)
        example = torch.zeros(2, 3, 32, 32, device=device)
        with torch.no_grad():
            t_ex = t_heads.eval()(example)
        t_dims = [f.shape[1:] for f in [*t_ex.head_features, t_ex.final_feature]]
        opts = setup.cohort

        def build() -> DistillStep:
            student = setup.build_student()
            s_heads = kdloss.IntermediateHeads(
                student,
                _head_paths(setup.student, head),
                setup.num_classes,
                example_input=torch.zeros(2, 3, 32, 32),
                detach=False,
                **_heads_kwargs(setup.student, head),
            )
            if head == "mhkd":
                k = len(s_heads.paths)
                weights = [opts.mhkd_head_weight] * k + [1.0]  # the head pairs, then the final classifiers
                loss = kdloss.MultiHeadKDLoss(setup.temperature, alpha=setup.kd_weight, weights=weights)
                return HeadsStep(student, s_heads, loss, None)
            with torch.no_grad():
                s_ex = s_heads(torch.zeros(2, 3, 32, 32))
            s_feats = [*s_ex.head_features, s_ex.final_feature]
            adapters = nn.ModuleList(
                kdloss.adapter_for(s, torch.zeros(2, *d)) for s, d in zip(s_feats, t_dims, strict=True)
            )
            tofd = kdloss.TOFDLoss(setup.temperature, alpha=setup.kd_weight, beta=opts.tofd_beta, gamma=opts.tofd_gamma)
            return HeadsStep(student, s_heads, tofd, adapters)

        return Built(build, HeadsTeacher(setup.teacher_model, t_heads))

    return make


def make_self_distill(setup: MethodSetup) -> Built:
    """``self-distill``: a ``SelfDistillStep`` with exits on every stage but the last."""
    exits = list(model_spec(setup.student).stage_paths[:-1])
    if not exits:
        raise TrainerError(f"self-distill needs a student with two stages or more; {setup.student} has one")
    if abs(setup.ce_weight + setup.kd_weight - 1.0) > 1e-9:
        raise TrainerError(
            "self-distill weighs each exit's CE 1 - kd_weight (kdloss.SelfDistillationLoss's alpha): the CE and KD "
            f"weights must add up to 1, got ce_weight={setup.ce_weight} and kd_weight={setup.kd_weight}"
        )
    channels = [s[0] for s in shapes(setup.build_student(), exits)]

    def build() -> DistillStep:
        return SelfDistillStep(
            setup.build_student(),
            exits,
            channels,
            setup.num_classes,
            temperature=setup.temperature,
            ce_weight=setup.ce_weight,
            kd_weight=setup.kd_weight,
        )

    return Built(build, None)
