"""Hint methods: ``fitnet``, ``fitnet2``, ``hint-last`` (kdloss's ``hint`` family).

=============  ================================================================================
``fitnet``     FitNets hint, one stage as in the community benchmark: ``CE + 100 * MSE(r(f_s),
               f_t)`` on the benchmark's hint layers (student and teacher ``hint_path``), ``r`` a
               trainable 3x3 conv-BN-ReLU regressor on the student side (Romero et al., ICLR 2015)
``fitnet2``    FitNets in two stages, as in the DIH paper: stage 1 trains the student up to its
               guided layer and the regressor on the hint alone (``HintOptions.stage1_epochs``,
               SGD nesterov); stage 2 is ``kd`` from those weights
``hint-last``  ``CE + w * MSE(conv1x1(f_s), f_t)`` on the last stage (a trainable 1x1 conv to the
               teacher's channels; ``w = HintOptions.last_weight``), the KD blog's "feature" method
=============  ================================================================================
"""

from __future__ import annotations

import kdloss
from reference_trainers.engine import DistillStep
from reference_trainers.errors import TrainerError
from reference_trainers.methods.common import shapes
from reference_trainers.methods.registry import Built, MethodSetup
from reference_trainers.methods.steps import HintOnlyStep, HintStep, KDStep, TeacherOutputs
from reference_trainers.models import feature_shapes, model_spec

__all__ = ["hint_shapes", "make_fitnet", "make_fitnet2", "make_hint_last", "regressor"]


def hint_shapes(setup: MethodSetup) -> tuple[str, str, tuple[int, ...], tuple[int, ...]]:
    """The student's and the teacher's ``hint_path`` and their feature shapes.

    Raises:
        TrainerError: their spatial sizes differ (the regressor is a same-size 3x3 conv).
    """
    s_path, t_path = model_spec(setup.student).hint_path, model_spec(setup.teacher).hint_path
    (s_shape,) = feature_shapes(setup.build_student(), [s_path]).values()
    (t_shape,) = feature_shapes(setup.teacher_model, [t_path]).values()
    if s_shape[1:] != t_shape[1:]:
        raise TrainerError(
            f"FitNets pairs {setup.student}.{s_path} {s_shape} with {setup.teacher}.{t_path} {t_shape}: "
            "their spatial sizes differ, which this regressor (a same-size 3x3 conv) does not handle"
        )
    return s_path, t_path, s_shape, t_shape


def regressor(s_shape: tuple[int, ...], t_shape: tuple[int, ...]) -> kdloss.ConvAdapter:
    """The benchmark's ConvReg for equal resolutions: 3x3 conv, BN, ReLU."""
    return kdloss.ConvAdapter(s_shape[0], t_shape[0], kernel_size=3, bn=True, relu=True)


def make_fitnet(setup: MethodSetup) -> Built:
    """``fitnet``: :class:`~reference_trainers.methods.steps.HintStep` with ``HintOptions.weight``."""
    s_path, t_path, s_shape, t_shape = hint_shapes(setup)
    weight = setup.hint.weight

    def build() -> DistillStep:
        return HintStep(setup.build_student(), s_path, regressor(s_shape, t_shape), hint_weight=weight, ce_weight=1.0)

    return Built(build, TeacherOutputs(setup.teacher_model, {"features": t_path}))


def make_fitnet2(setup: MethodSetup) -> Built:
    """``fitnet2``: a hint-only stage 1 (:class:`~reference_trainers.methods.steps.HintOnlyStep`), then KD."""
    if setup.train_phase is None:
        raise TrainerError("method 'fitnet2' needs a recipe that can train its stage 1 (train_phase)")
    s_path, t_path, s_shape, t_shape = hint_shapes(setup)
    t_side = TeacherOutputs(setup.teacher_model, {"features": t_path})
    stage1 = setup.train_phase(
        "fitnet2-stage1",
        lambda: HintOnlyStep(setup.build_student(), s_path, regressor(s_shape, t_shape)),
        t_side,
        setup.hint.stage1_epochs,
        "nesterov",
    )
    weights = {k: v.detach().clone() for k, v in stage1.student.state_dict().items()}

    def build() -> DistillStep:
        student = setup.build_student()
        student.load_state_dict(weights)
        return KDStep(student, temperature=setup.temperature, kd_weight=setup.kd_weight, ce_weight=setup.ce_weight)

    return Built(build, TeacherOutputs(setup.teacher_model))


def make_hint_last(setup: MethodSetup) -> Built:
    """``hint-last``: :class:`~reference_trainers.methods.steps.HintStep` on the last stages, 1x1 conv adapter."""
    s_path, t_path = model_spec(setup.student).stage_paths[-1], model_spec(setup.teacher).stage_paths[-1]
    (s_shape,) = shapes(setup.build_student(), [s_path])
    (t_shape,) = shapes(setup.teacher_model, [t_path])
    weight = setup.hint.last_weight

    def build() -> DistillStep:
        adapter = kdloss.ConvAdapter(s_shape[0], t_shape[0], 1)
        return HintStep(setup.build_student(), s_path, adapter, hint_weight=weight, ce_weight=1.0)

    return Built(build, TeacherOutputs(setup.teacher_model, {"features": t_path}))
