"""Language-model methods: ``student-ce``, ``kd-forward``, ``kd-reverse``, ``kd-jsd``, ``kd-tv``, ``kd-topk``
(kdloss's ``fused_linear`` family), for :class:`~reference_trainers.models.causal_lm.CausalLM` students.

==============  ===================================================================================
``student-ce``  next-token cross-entropy only (:class:`~reference_trainers.methods.steps.LMCEStep`)
``kd-forward``  ``kdloss.FusedLinearKDLoss`` on the student's hidden states and output weight and the
``kd-reverse``  teacher's (the logits are never materialised): ``kd_weight * T**2 * D + (1 -
``kd-jsd``      kd_weight) * CE`` with the divergence ``D`` of the name (JSD with
``kd-tv``       ``FusedLinearOptions.jsd_weight``); the teacher side is a
                :class:`~reference_trainers.methods.steps.TeacherHidden`
``kd-topk``     ``kdloss.SparseKDLoss`` from the teacher's top-``FusedLinearOptions.topk``
                log-probabilities per token and their tail mass (at a temperature other than 1 the
                top-k are renormalised and the tail is not used); the teacher side is a
                :class:`~reference_trainers.methods.steps.TeacherTopKSide`, whose outputs a recipe
                may also read from a :class:`kdloss.TeacherTopK` store
==============  ===================================================================================

These methods are not in :data:`~reference_trainers.methods.METHODS`. That table's contract is
``make(MethodSetup) -> Built`` for image classifiers: a :class:`~reference_trainers.methods.MethodSetup`
names the student and teacher in the image-model registry
(:func:`~reference_trainers.models.build_model`), carries the number of classes and the teacher's
logits and tapped features, and every CIFAR recipe offers every entry under ``--method``. These
take causal language models (an :class:`~reference_trainers.models.causal_lm.LMConfig` and the
teacher's hidden states, output weight or top-k), on next-token data; no image recipe could run
them. They are listed in :data:`LM_METHODS` and built by :func:`make_lm_method`.
"""

from __future__ import annotations

from typing import Literal

import kdloss
from reference_trainers.engine import DistillStep
from reference_trainers.errors import TrainerError
from reference_trainers.methods.options import FusedLinearOptions
from reference_trainers.methods.registry import Built
from reference_trainers.methods.steps import LMCEStep, LMFusedKDStep, LMSparseKDStep, TeacherHidden, TeacherTopKSide
from reference_trainers.models.causal_lm import CausalLM, LMConfig

__all__ = ["DIVERGENCE_OF", "LM_METHODS", "make_lm_method"]

LM_METHODS = ("student-ce", "kd-forward", "kd-reverse", "kd-jsd", "kd-tv", "kd-topk")
"""The language-model methods, in the order ``lm-distil`` runs them."""

DIVERGENCE_OF: dict[str, Literal["forward", "reverse", "jsd", "tv"]] = {
    "kd-forward": "forward",
    "kd-reverse": "reverse",
    "kd-jsd": "jsd",
    "kd-tv": "tv",
}
"""The ``FusedLinearKDLoss`` divergence of each fused method."""


def make_lm_method(
    method: str,
    student: LMConfig,
    teacher: CausalLM,
    options: FusedLinearOptions,
    *,
    hidden_side: TeacherHidden | None = None,
) -> Built:
    """The run of ``method`` (one of :data:`LM_METHODS`): a fresh ``CausalLM(student)`` in its step
    (built when the engine calls ``build``, after seeding) and the teacher side.

    Args:
        method: the method's name.
        student: the student's configuration.
        teacher: the trained teacher (frozen by its teacher side).
        options: the temperature, KD weight, JSD mixture weight and top-k.
        hidden_side: the teacher side of the fused methods, when a recipe shares one between them
            (so that one cache of the teacher's hidden states serves them all); default a new
            :class:`~reference_trainers.methods.steps.TeacherHidden`.

    Raises:
        TrainerError: an unknown method (the message lists :data:`LM_METHODS`).
    """
    if method == "student-ce":
        return Built(lambda: LMCEStep(CausalLM(student)), None)
    ce_weight, kd_weight = 1.0 - options.kd_weight, options.kd_weight
    if method in DIVERGENCE_OF:
        loss = kdloss.FusedLinearKDLoss(
            options.temperature,
            divergence=DIVERGENCE_OF[method],
            jsd_weight=options.jsd_weight if method == "kd-jsd" else None,
            hard_weight=ce_weight,
            soft_weight=kd_weight,
        )
        weight = teacher.head.weight

        def build_fused() -> DistillStep:
            return LMFusedKDStep(CausalLM(student), weight, loss)

        return Built(build_fused, hidden_side if hidden_side is not None else TeacherHidden(teacher))
    if method == "kd-topk":
        sparse = kdloss.SparseKDLoss(options.temperature, hard_weight=ce_weight, soft_weight=kd_weight)
        use_tail = options.temperature == 1.0

        def build_sparse() -> DistillStep:
            return LMSparseKDStep(CausalLM(student), sparse, use_tail=use_tail)

        return Built(build_sparse, TeacherTopKSide(teacher, options.topk))
    raise TrainerError(f"unknown language-model method {method!r}; choose from {', '.join(LM_METHODS)}")
