"""Attention transfer: ``at`` (kdloss's ``attention`` family).

``at``: ``CE + 1000 * sum_j mean_i (a_s - a_t)^2`` on every stage pair of equal resolution
(:func:`~reference_trainers.methods.common.matching_stage_pairs`), the weight
``AttentionOptions.beta`` (Zagoruyko & Komodakis, ICLR 2017; the community benchmark's beta).
"""

from __future__ import annotations

from reference_trainers.engine import DistillStep
from reference_trainers.errors import TrainerError
from reference_trainers.methods.common import matching_stage_pairs
from reference_trainers.methods.registry import Built, MethodSetup
from reference_trainers.methods.steps import AttentionStep, TeacherOutputs

__all__ = ["make_at"]


def make_at(setup: MethodSetup) -> Built:
    """``at``: :class:`~reference_trainers.methods.steps.AttentionStep` on the matching stage pairs."""
    pairs = matching_stage_pairs(setup.student, setup.teacher)
    if not pairs:
        raise TrainerError(
            f"attention transfer found no stages of equal resolution in {setup.student} and {setup.teacher}"
        )
    beta = setup.attention.beta

    def build() -> DistillStep:
        return AttentionStep(setup.build_student(), [s for s, _ in pairs], beta=beta, at_weight=1.0, ce_weight=1.0)

    return Built(build, TeacherOutputs(setup.teacher_model, {f"at{i}": t for i, (_, t) in enumerate(pairs)}))
