"""The trainers' distillation methods: one table, one builder module per family, the steps.

:data:`METHODS` is written out below, in one place: each entry names a method, says what it
computes, and points to its builder (``make(setup) -> Built``) in the module of its family,
named as in :mod:`kdloss.functional`:

==============================================  =================================================
:mod:`~reference_trainers.methods.logit`        ``ce``, ``kd``, ``dkd``, ``dist``, ``takd``
:mod:`~reference_trainers.methods.hint`         ``fitnet``, ``fitnet2``, ``hint-last``
:mod:`~reference_trainers.methods.attention`    ``at``
:mod:`~reference_trainers.methods.relational`   ``sp``, ``pkt``, ``rkd``, ``nst``, ``cc``, ``fsp``
:mod:`~reference_trainers.methods.feature`      ``vid``, ``ab``, ``ft``, ``reviewkd``
:mod:`~reference_trainers.methods.contrastive`  ``crd``
:mod:`~reference_trainers.methods.cohort`       ``dih``, ``mhkd``, ``tofd``, ``self-distill``
==============================================  =================================================

The language-model methods of the ``lm-distil`` recipe are built in
:mod:`~reference_trainers.methods.fused_linear` and are not in :data:`METHODS`: that table's
methods take a :class:`MethodSetup` of image classifiers, theirs causal language models (the
module says why).

The student and teacher sides they build are in :mod:`~reference_trainers.methods.steps`
(re-exported here), their typed options in :mod:`~reference_trainers.methods.options`, the
setup they get in :mod:`~reference_trainers.methods.registry`. Defaults are the community
CIFAR-100 benchmark's (RepDistiller, the code of Tian, Krishnan & Isola's CRD paper, ICLR 2020)
unless a method's module says otherwise. ``docs/architecture.md`` shows how to add one.
"""

from __future__ import annotations

from reference_trainers.methods import attention, cohort, contrastive, feature, hint, logit, relational
from reference_trainers.methods.common import matching_stage_pairs
from reference_trainers.methods.options import (
    AttentionOptions,
    CohortOptions,
    ContrastiveOptions,
    FeatureOptions,
    FusedLinearOptions,
    HintOptions,
    LogitOptions,
    RelationalOptions,
)
from reference_trainers.methods.registry import (
    METHODS,
    Built,
    MethodEntry,
    MethodSetup,
    PhaseTrainer,
    available_methods,
    get_method,
    register_method,
)
from reference_trainers.methods.steps import (
    AttentionStep,
    CEStep,
    CohortStep,
    CohortTeacher,
    CosineStep,
    CRDStep,
    DKDStep,
    FeatureLossStep,
    FeatureRelationStep,
    FTPretrainStep,
    HeadsStep,
    HeadsTeacher,
    HintOnlyStep,
    HintStep,
    KDStep,
    LMCEStep,
    LMFusedKDStep,
    LMSparseKDStep,
    LMStudent,
    LogitStep,
    ParaphrasedTeacher,
    SelfDistillStep,
    TappedStep,
    TeacherHidden,
    TeacherOutputs,
    TeacherTopKSide,
    student_lm,
)

__all__ = [
    "METHODS",
    "AttentionOptions",
    "AttentionStep",
    "Built",
    "CEStep",
    "CRDStep",
    "CohortOptions",
    "CohortStep",
    "CohortTeacher",
    "ContrastiveOptions",
    "CosineStep",
    "DKDStep",
    "FTPretrainStep",
    "FeatureLossStep",
    "FeatureOptions",
    "FeatureRelationStep",
    "FusedLinearOptions",
    "HeadsStep",
    "HeadsTeacher",
    "HintOnlyStep",
    "HintOptions",
    "HintStep",
    "KDStep",
    "LMCEStep",
    "LMFusedKDStep",
    "LMSparseKDStep",
    "LMStudent",
    "LogitOptions",
    "LogitStep",
    "MethodEntry",
    "MethodSetup",
    "ParaphrasedTeacher",
    "PhaseTrainer",
    "RelationalOptions",
    "SelfDistillStep",
    "TappedStep",
    "TeacherHidden",
    "TeacherOutputs",
    "TeacherTopKSide",
    "available_methods",
    "get_method",
    "matching_stage_pairs",
    "register_method",
    "student_lm",
]


def _relation(name: str) -> MethodEntry:
    _, weight_name, _, help_ = relational.RELATIONS[name]
    weight = getattr(RelationalOptions(), weight_name)
    loss = relational.RELATIONS[name][0].__name__
    return MethodEntry(name, f"{help_}: CE + {weight:g} * {loss}", relational.make_relation(name))


# In the order of earlier versions (the CLI's --help lists them so); each builder is in its family's module.
METHODS.update(
    {
        entry.name: entry
        for entry in (
            MethodEntry("ce", "the student alone (cross-entropy)", logit.make_ce),
            MethodEntry("kd", "Hinton KD: ce_weight * CE + kd_weight * KL_T^2", logit.make_kd),
            MethodEntry(
                "fitnet", "FitNets hint (one stage, CE + 100 * MSE, 3x3 conv-BN-ReLU regressor)", hint.make_fitnet
            ),
            MethodEntry("fitnet2", "FitNets in two stages (hint pre-training, then KD), as in DIH", hint.make_fitnet2),
            MethodEntry("at", "attention transfer on equal-resolution stage pairs (CE + beta 1000)", attention.make_at),
            MethodEntry("dkd", "decoupled KD (CE + DKD, alpha 1, beta 8, 20-epoch warm-up)", logit.make_dkd),
            MethodEntry("dist", "DIST (CE + inter/intra-class Pearson relations, beta = gamma = 2)", logit.make_dist),
            _relation("sp"),
            _relation("pkt"),
            _relation("rkd"),
            _relation("nst"),
            MethodEntry(
                "dih",
                "DIH: fine-tune heads on the frozen teacher, then the cohort teaches (CohortLoss)",
                cohort.make_dih,
            ),
            MethodEntry(
                "cc", "correlation congruence: CE + 0.02 * CC, linear embed on the student", relational.make_cc
            ),
            MethodEntry("vid", "variational information distillation: CE + 1 * VID per stage pair", feature.make_vid),
            MethodEntry("ab", "activation boundaries: AB init phase (--init-epochs), then CE", feature.make_ab),
            MethodEntry("ft", "factor transfer: paraphraser pre-training, then CE + 200 * FT", feature.make_ft),
            MethodEntry(
                "fsp", "flow of solution procedure: FSP init phase (--init-epochs), then CE", relational.make_fsp
            ),
            MethodEntry("reviewkd", "ReviewKD: CE + 1 * HCL(ABF fusion), 20-epoch warm-up", feature.make_reviewkd),
            MethodEntry(
                "mhkd", "MHKD: paired mhkd heads on teacher and student (MultiHeadKDLoss)", cohort.make_heads("mhkd")
            ),
            MethodEntry(
                "tofd", "TOFD: paired task-oriented heads, feature L2 + orthogonal adapters", cohort.make_heads("tofd")
            ),
            MethodEntry(
                "crd",
                "CRD: CE + beta * contrastive loss with memory banks (benchmark: CE 1, beta 0.8; dih: alpha 0.1, "
                "beta 0.03)",
                contrastive.make_crd,
            ),
            MethodEntry(
                "takd", "TAKD: the assistant --ta learns with KD from the teacher, the student from it", logit.make_takd
            ),
            MethodEntry(
                "hint-last",
                "CE + w * MSE(conv1x1(f_s), f_t) on the last stages (the KD blog's feature method)",
                hint.make_hint_last,
            ),
            MethodEntry(
                "self-distill",
                "self-distillation: early exits on the student's stages learn from its final output (no teacher)",
                cohort.make_self_distill,
            ),
        )
    }
)
