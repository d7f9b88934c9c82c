"""Feature methods with trainable parts: ``vid``, ``ab``, ``ft``, ``reviewkd`` (kdloss's ``feature`` family).

Weights are the community benchmark's (CRD / RepDistiller ``train_student.py``, cross-entropy
weight 1, no KL term; :class:`~reference_trainers.methods.options.FeatureOptions`) unless said;
every trainable part (regressor, connector, translator, fusion) is an attribute of the student
step, so the optimiser, the checkpoint and ``--resume`` see it. Init / pre-training phases run
through the recipe's :data:`~reference_trainers.methods.registry.PhaseTrainer` (checkpointed and
resumable).

============  =================================================================================
``vid``       ``CE + 1 * sum_j VIDLoss`` on every equal-resolution stage pair, one
              ``kdloss.VIDRegressor(C_s, C_t, C_t)`` per pair (Ahn et al., CVPR 2019)
``ab``        init phase (``MethodSetup.init_epochs``, 30 in RepDistiller): the student's layers
              before the classifier and one ``kdloss.ABConnector`` per stage learn ``3/1000 *
              sum_j 2^(j-n+1) * ABLoss`` (batch mean) on the pre-ReLU stage maps (RepDistiller's
              ``ABLoss``: stage weights, ``/ B``, ``/ 1000 * 3``); then ``CE`` from those weights
              (weight 0 in the main phase, as RepDistiller) (Heo et al., AAAI 2019)
``ft``        pre-training phase: ``kdloss.FTParaphraser(C_t, rate=0.5, batch_norm=False)``
              (RepDistiller's paraphraser) learns to reconstruct the teacher's last stage map
              (MSE, ``MethodSetup.init_epochs``), then is frozen on the teacher side; main: ``CE +
              200 * FTLoss(variant="repdistiller", reduction="mean")`` (RepDistiller's
              ``FactorTransfer`` and its weight) with a trainable ``FTTranslator`` on the
              student's last stage map (Kim et al., NeurIPS 2018)
``reviewkd``  ``CE + 1 * min(1, epoch / 20) * HCLLoss(ReviewKDFusion(stage maps), teacher stage
              maps)``, the fusion ``mid_channels = min(512, C_s last)`` (Chen et al., CVPR 2021;
              weight 1 and the 20-epoch warm-up as in its CIFAR-100 code and mdistiller)
============  =================================================================================
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

import kdloss
from reference_trainers.engine import DistillStep
from reference_trainers.errors import TrainerError
from reference_trainers.methods.common import (
    freeze_classifier,
    init_then_ce,
    module_device,
    preact_paths,
    shapes,
    stage_pairs,
)
from reference_trainers.methods.registry import Built, MethodSetup
from reference_trainers.methods.steps import FeatureLossStep, FTPretrainStep, ParaphrasedTeacher, TeacherOutputs
from reference_trainers.models import model_spec, stage_paths

__all__ = ["AB_INIT_SCALE", "make_ab", "make_ft", "make_reviewkd", "make_vid", "stage_parts"]

AB_INIT_SCALE = 3.0 / 1000.0  # RepDistiller's ABLoss: each stage's term / 1000 * 3


def stage_parts(step: FeatureLossStep) -> nn.ModuleList:
    """``step.parts`` as the per-stage list that VID and AB build (one module per tapped stage)."""
    if not isinstance(step.parts, nn.ModuleList):
        raise TypeError(
            f"FeatureLossStep({step.name}) needs parts as an nn.ModuleList, got {type(step.parts).__name__}"
        )
    return step.parts


def make_vid(setup: MethodSetup) -> Built:
    """``vid``: one VID regressor per equal-resolution stage pair."""
    s_paths, t_paths = stage_pairs(setup, "VID")
    s_shapes = shapes(setup.build_student(), s_paths)
    t_shapes = shapes(setup.teacher_model, t_paths)
    weight = setup.feature.vid_weight
    loss = kdloss.VIDLoss()

    def compute(step: FeatureLossStep, teacher: dict[str, Tensor]) -> Tensor:
        total = torch.zeros((), device=teacher["logits"].device)
        for i, (f, reg) in enumerate(zip(step.feats(), stage_parts(step), strict=True)):
            mean, var = reg(f)
            total = total + loss(mean.float(), teacher[f"vid{i}"].float(), var.float())
        return total

    def build() -> DistillStep:
        regs = nn.ModuleList(kdloss.VIDRegressor(s[0], t[0], t[0]) for s, t in zip(s_shapes, t_shapes, strict=True))
        return FeatureLossStep(setup.build_student(), s_paths, regs, "vid", compute, beta=weight)

    return Built(build, TeacherOutputs(setup.teacher_model, {f"vid{i}": t for i, t in enumerate(t_paths)}))


def make_ab(setup: MethodSetup) -> Built:
    """``ab``: an AB init phase on the pre-ReLU stage maps, then cross-entropy."""
    s_paths, t_paths = stage_pairs(setup, "AB")
    s_shapes = shapes(setup.build_student(), s_paths)
    t_shapes = shapes(setup.teacher_model, t_paths)
    n = len(s_paths)
    loss = kdloss.ABLoss(margin=1.0)

    def compute(step: FeatureLossStep, teacher: dict[str, Tensor]) -> Tensor:
        total = torch.zeros((), device=teacher["logits"].device)
        for i, (f, conn) in enumerate(zip(step.feats(), stage_parts(step), strict=True)):
            # RepDistiller weighs the stages 2^(i - n + 1): the deepest counts most.
            total = total + 2.0 ** (i - n + 1) * loss(conn(f).float(), teacher[f"pre{i}"].float())
        return total

    s_pre = preact_paths(setup.build_student(), setup.student, s_paths)
    t_pre = preact_paths(setup.teacher_model, setup.teacher, t_paths)

    def init_build() -> DistillStep:
        student = setup.build_student()
        freeze_classifier(student, setup.student)
        conns = nn.ModuleList(kdloss.ABConnector(s[0], t[0]) for s, t in zip(s_shapes, t_shapes, strict=True))
        return FeatureLossStep(student, s_pre, conns, "ab", compute, beta=AB_INIT_SCALE, ce_weight=0.0)

    t_side = TeacherOutputs(setup.teacher_model, {f"pre{i}": p for i, p in enumerate(t_pre)})
    return init_then_ce(setup, "ab", init_build, t_side)


def make_ft(setup: MethodSetup) -> Built:
    """``ft``: pre-train the paraphraser on the teacher, then ``CE + FT`` with a trainable translator."""
    if setup.train_phase is None:
        raise TrainerError("method 'ft' needs a recipe that can pre-train its paraphraser (train_phase)")
    s_path, t_path = model_spec(setup.student).stage_paths[-1], model_spec(setup.teacher).stage_paths[-1]
    (s_shape,) = shapes(setup.build_student(), [s_path])
    (t_shape,) = shapes(setup.teacher_model, [t_path])
    weight = setup.feature.ft_weight
    pre = setup.train_phase(
        "ft-paraphraser",
        lambda: FTPretrainStep(
            copy.deepcopy(setup.teacher_model), kdloss.FTParaphraser(t_shape[0], rate=0.5, batch_norm=False)
        ),
        TeacherOutputs(setup.teacher_model, {"ft": t_path}),
        setup.init_epochs,
        "main",
    )
    paraphraser = pre.paraphraser
    if not isinstance(paraphraser, kdloss.FTParaphraser):
        raise TrainerError("the FT pre-training phase returned no paraphraser")
    factor_channels = int(paraphraser.factor_channels) if hasattr(paraphraser, "factor_channels") else -1
    if factor_channels <= 0:
        with torch.no_grad():
            probe = torch.zeros(1, *t_shape, device=module_device(paraphraser))
            factor_channels = int(paraphraser(probe)[0].shape[1])
    # RepDistiller's FactorTransfer: the normalised channel mean of factor^2 (H * W entries), L1,
    # mean over the batch and the entries; its weight 200 (FeatureOptions.ft_weight) belongs to this variant.
    loss = kdloss.FTLoss(variant="repdistiller", reduction="mean")

    def compute(step: FeatureLossStep, teacher: dict[str, Tensor]) -> Tensor:
        (f,) = step.feats()
        out: Tensor = loss(step.parts(f).float(), teacher["factor"].float())
        return out

    def build() -> DistillStep:
        tr = kdloss.FTTranslator(s_shape[0], factor_channels)
        return FeatureLossStep(setup.build_student(), [s_path], tr, "ft", compute, beta=weight)

    return Built(build, ParaphrasedTeacher(setup.teacher_model, t_path, paraphraser))


def make_reviewkd(setup: MethodSetup) -> Built:
    """``reviewkd``: HCL over the ABF fusion of the student's stages, with a linear warm-up."""
    s_paths, t_paths = list(stage_paths(setup.student)), list(stage_paths(setup.teacher))
    if len(s_paths) != len(t_paths):
        raise TrainerError(
            f"ReviewKD pairs the stages one to one: {setup.student} has {len(s_paths)}, {setup.teacher} {len(t_paths)}"
        )
    s_shapes = shapes(setup.build_student(), s_paths)
    t_shapes = shapes(setup.teacher_model, t_paths)
    if [s[1:] for s in s_shapes] != [t[1:] for t in t_shapes]:
        raise TrainerError(f"ReviewKD needs equal stage resolutions: {s_shapes} vs {t_shapes}")
    weight, warmup = setup.feature.reviewkd_weight, setup.feature.reviewkd_warmup
    mid = min(512, s_shapes[-1][0])
    loss = kdloss.HCLLoss()

    def compute(step: FeatureLossStep, teacher: dict[str, Tensor]) -> Tensor:
        fused = step.parts(step.feats())
        out: Tensor = loss([f.float() for f in fused], [teacher[f"rev{i}"].float() for i in range(len(fused))])
        return out

    def build() -> DistillStep:
        fusion = kdloss.ReviewKDFusion([s[0] for s in s_shapes], [t[0] for t in t_shapes], mid_channels=mid)
        student = setup.build_student()
        return FeatureLossStep(
            student,
            s_paths,
            fusion,
            "reviewkd",
            compute,
            beta=weight,
            warmup_epochs=warmup,
            steps_per_epoch=setup.steps_per_epoch,
        )

    return Built(build, TeacherOutputs(setup.teacher_model, {f"rev{i}": t for i, t in enumerate(t_paths)}))
