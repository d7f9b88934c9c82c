"""Logit methods: ``ce``, ``kd``, ``dkd``, ``dist``, ``takd`` (kdloss's ``kl``, ``logit`` families).

==========  ===================================================================================
``ce``      the student alone, cross-entropy (no teacher)
``kd``      ``ce_weight * CE + kd_weight * KL_T^2`` (Hinton et al., 2015)
``dkd``     decoupled KD, ``CE + DKD(alpha 1, beta 8)`` with a 20-epoch warm-up (Zhao et al., CVPR 2022)
``dist``    DIST, ``CE + DIST(beta = gamma = 2)`` (Huang et al., NeurIPS 2022)
``takd``    one teacher assistant (Mirzadeh et al., AAAI 2020): ``LogitOptions.ta`` is trained with
            KD from the teacher (a checkpointed, resumable phase ``takd-ta-<MODEL>`` of
            ``LogitOptions.ta_epochs``, default the run's epochs), then the student with KD from
            the trained assistant; both with the recipe's KD setting
==========  ===================================================================================
"""

from __future__ import annotations

from torch import nn

import kdloss
from reference_trainers.engine import DistillStep
from reference_trainers.errors import TrainerError
from reference_trainers.methods.registry import Built, MethodSetup
from reference_trainers.methods.steps import CEStep, DKDStep, KDStep, LogitStep, TeacherOutputs
from reference_trainers.models import MODEL_NAMES, build_model

__all__ = ["make_ce", "make_dist", "make_dkd", "make_kd", "make_takd"]


def make_ce(setup: MethodSetup) -> Built:
    """``ce``: :class:`~reference_trainers.methods.steps.CEStep`, no teacher."""
    return Built(lambda: CEStep(setup.build_student()), None)


def _kd_step(setup: MethodSetup, student: nn.Module) -> KDStep:
    """:class:`~reference_trainers.methods.steps.KDStep` of ``student`` with the setup's weights and temperature."""
    return KDStep(student, temperature=setup.temperature, kd_weight=setup.kd_weight, ce_weight=setup.ce_weight)


def make_kd(setup: MethodSetup) -> Built:
    """``kd``: :class:`~reference_trainers.methods.steps.KDStep` with the setup's weights and temperature."""
    return Built(lambda: _kd_step(setup, setup.build_student()), TeacherOutputs(setup.teacher_model))


def make_dkd(setup: MethodSetup) -> Built:
    """``dkd``: ``CE + DKDLoss`` (:class:`~reference_trainers.methods.options.LogitOptions`)."""
    opts = setup.logit

    def build() -> DistillStep:
        loss = kdloss.DKDLoss(
            alpha=opts.dkd_alpha, beta=opts.dkd_beta, temperature=setup.temperature, warmup_epochs=opts.dkd_warmup
        )
        return DKDStep(setup.build_student(), loss, ce_weight=1.0, steps_per_epoch=setup.steps_per_epoch)

    return Built(build, TeacherOutputs(setup.teacher_model))


def make_dist(setup: MethodSetup) -> Built:
    """``dist``: ``CE + DISTLoss`` (:class:`~reference_trainers.methods.options.LogitOptions`)."""
    opts = setup.logit

    def build() -> DistillStep:
        loss = kdloss.DISTLoss(beta=opts.dist_beta, gamma=opts.dist_gamma, temperature=setup.temperature)
        return LogitStep(setup.build_student(), loss, "dist", ce_weight=1.0)

    return Built(build, TeacherOutputs(setup.teacher_model))


def make_takd(setup: MethodSetup) -> Built:
    """``takd``: train the assistant ``LogitOptions.ta`` with KD, then the student with KD from it."""
    ta = setup.logit.ta
    if not ta:
        raise TrainerError("method 'takd' needs a teacher assistant: pass --ta MODEL (e.g. --ta resnet20)")
    if ta not in MODEL_NAMES:
        raise TrainerError(f"--ta {ta!r} is not a registered model; choose one of {', '.join(MODEL_NAMES)}")
    if setup.train_phase is None:
        raise TrainerError("method 'takd' needs a recipe that can train its assistant phase (train_phase)")
    epochs = setup.logit.ta_epochs if setup.logit.ta_epochs is not None else setup.epochs

    def build_ta() -> DistillStep:
        return _kd_step(setup, build_model(ta, setup.num_classes))

    if setup.log is not None:
        setup.log(f"TAKD: training the assistant {ta} with KD from {setup.teacher} for {epochs} epochs")
    ta_step = setup.train_phase(f"takd-ta-{ta}", build_ta, TeacherOutputs(setup.teacher_model), epochs, "main")
    assistant = ta_step.student.eval()
    return Built(lambda: _kd_step(setup, setup.build_student()), TeacherOutputs(assistant))
