"""Relational methods: ``sp``, ``pkt``, ``rkd``, ``nst``, ``cc``, ``fsp`` (kdloss's ``relational`` family).

The community benchmark's weights (:class:`~reference_trainers.methods.options.RelationalOptions`),
cross-entropy weight 1, no KL term:

=======  ======================================================================================
``sp``   ``CE + 3000 * SP`` on the last stage (Tung & Mori, ICCV 2019)
``pkt``  ``CE + 30000 * PKT`` on the penultimate feature (Passalis & Tefas, ECCV 2018)
``rkd``  ``CE + RKD`` (distance 25 + angle 50) on the penultimate feature (Park et al., CVPR 2019)
``nst``  ``CE + 50 * NST`` on every equal-resolution stage pair (Huang & Wang, 2017)
``cc``   ``CE + 0.02 * CCLoss(variant="repdistiller")`` on the penultimate feature, the student's
         through a trainable ``kdloss.LinearAdapter(D_s, D_t)`` (Peng et al., ICCV 2019)
``fsp``  init phase (``MethodSetup.init_epochs``): the student's layers before the classifier
         learn ``FSPLoss(variant="repdistiller")`` on the stem and stage maps; then ``CE`` (weight 0
         in the main phase, as RepDistiller) (Yim et al., CVPR 2017)
=======  ======================================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from torch import Tensor, nn

import kdloss
from reference_trainers.engine import DistillStep
from reference_trainers.errors import TrainerError
from reference_trainers.methods.common import freeze_classifier, init_then_ce, matching_stage_pairs, shapes
from reference_trainers.methods.registry import Built, MethodSetup
from reference_trainers.methods.steps import FeatureLossStep, FeatureRelationStep, TeacherOutputs
from reference_trainers.models import model_spec

__all__ = ["RELATIONS", "make_cc", "make_fsp", "make_relation"]

Features = Literal["last", "penultimate", "stages"]

RELATIONS: dict[str, tuple[Callable[[], nn.Module], str, Features, str]] = {
    # name -> (loss, its weight in RelationalOptions, which features, help)
    "sp": (kdloss.SPLoss, "sp_weight", "last", "similarity-preserving KD on the last stage (Tung & Mori, ICCV 2019)"),
    "pkt": (
        kdloss.PKTLoss,
        "pkt_weight",
        "penultimate",
        "probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018)",
    ),
    "rkd": (
        kdloss.RKDLoss,
        "rkd_weight",
        "penultimate",
        "relational KD, distance 25 + angle 50 (Park et al., CVPR 2019)",
    ),
    "nst": (
        kdloss.NSTLoss,
        "nst_weight",
        "stages",
        "neuron selectivity transfer on every stage pair (Huang & Wang, 2017)",
    ),
}


def make_relation(name: str) -> Callable[[MethodSetup], Built]:
    """The ``make`` of ``sp``, ``pkt``, ``rkd`` or ``nst``: a ``FeatureRelationStep``."""
    loss_cls, weight_name, which, _ = RELATIONS[name]

    def make(setup: MethodSetup) -> Built:
        s_spec, t_spec = model_spec(setup.student), model_spec(setup.teacher)
        if which == "penultimate":
            pairs = [(s_spec.feature_path, t_spec.feature_path)]
        elif which == "last":
            pairs = [(s_spec.stage_paths[-1], t_spec.stage_paths[-1])]
        else:
            pairs = matching_stage_pairs(setup.student, setup.teacher)
        weight = float(getattr(setup.relational, weight_name))

        def build() -> DistillStep:
            student = setup.build_student()
            return FeatureRelationStep(
                student, [s for s, _ in pairs], loss_cls(), name, beta=weight, single=which == "penultimate"
            )

        t_side = TeacherOutputs(setup.teacher_model, {f"rel{i}": t for i, (_, t) in enumerate(pairs)})
        return Built(build, t_side)

    return make


def make_cc(setup: MethodSetup) -> Built:
    """``cc``: CC on the penultimate features, the student's through a trainable linear adapter."""
    s_path, t_path = model_spec(setup.student).feature_path, model_spec(setup.teacher).feature_path
    (d_s,) = shapes(setup.build_student(), [s_path])
    (d_t,) = shapes(setup.teacher_model, [t_path])
    weight = setup.relational.cc_weight
    loss = kdloss.CCLoss(variant="repdistiller")

    def compute(step: FeatureLossStep, teacher: dict[str, Tensor]) -> Tensor:
        (f,) = step.feats()
        out: Tensor = loss(step.parts(f.flatten(1)).float(), teacher["emb"].flatten(1).float())
        return out

    def build() -> DistillStep:
        adapter = kdloss.LinearAdapter(d_s[0], d_t[0])
        return FeatureLossStep(setup.build_student(), [s_path], adapter, "cc", compute, beta=weight)

    return Built(build, TeacherOutputs(setup.teacher_model, {"emb": t_path}))


def make_fsp(setup: MethodSetup) -> Built:
    """``fsp``: an FSP init phase, then cross-entropy."""
    s_spec, t_spec = model_spec(setup.student), model_spec(setup.teacher)
    # RepDistiller's feat[:-1]: the stem, then the stages (the stages alone where a model names no stem).
    s_paths = [p for p in (s_spec.stem_path, *s_spec.stage_paths) if p is not None]
    t_paths = [p for p in (t_spec.stem_path, *t_spec.stage_paths) if p is not None]
    if len(s_paths) != len(t_paths):
        raise TrainerError(
            f"FSP pairs the stages one to one: {s_paths} of {setup.student}, {t_paths} of {setup.teacher}"
        )
    s_ch = [s[0] for s in shapes(setup.build_student(), s_paths)]
    t_ch = [s[0] for s in shapes(setup.teacher_model, t_paths)]
    if s_ch != t_ch:
        raise TrainerError(
            f"FSP needs equal channel counts per stage: {setup.student} has {s_ch}, {setup.teacher} has {t_ch}"
        )
    loss = kdloss.FSPLoss(variant="repdistiller")

    def compute(step: FeatureLossStep, teacher: dict[str, Tensor]) -> Tensor:
        s = [f.float() for f in step.feats()]
        out: Tensor = loss(s, [teacher[f"fsp{i}"].float() for i in range(len(s))])
        return out

    def init_build() -> DistillStep:
        student = setup.build_student()
        freeze_classifier(student, setup.student)
        return FeatureLossStep(student, s_paths, nn.Identity(), "fsp", compute, beta=1.0, ce_weight=0.0)

    t_side = TeacherOutputs(setup.teacher_model, {f"fsp{i}": t for i, t in enumerate(t_paths)})
    return init_then_ce(setup, "fsp", init_build, t_side)
