"""Module forms of :mod:`kdloss.functional.cohort` (DIH cohorts, MHKD, TOFD, self-distillation)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from kdloss._validate import (
    Reduction,
    check_nonnegative,
    check_positive,
    check_reduction,
    check_unit_interval,
    check_weights,
)
from kdloss.compose import LossParts
from kdloss.functional.cohort import (
    COHORT_FORMS,
    COHORT_REDUCTIONS,
    CohortForm,
    TeacherLogits,
    cohort_kd,
    paired_head_kd,
    self_distillation_loss,
    tofd_authors_loss,
    tofd_loss,
    tofd_temperature,
)

__all__ = ["CohortLoss", "MultiHeadKDLoss", "SelfDistillationLoss", "TOFDAuthorsLoss", "TOFDLoss"]


class _SoftenedKD(nn.Module):
    """What the cohort losses with a KD term share: the temperature ``T > 0`` and the KD weight
    ``alpha`` in ``[0, 1]``, checked when the module is built. The repr shows them, then the
    attributes ``_shown`` names, then ``weights`` when there are any."""

    _shown: tuple[str, ...] = ()
    weights: list[float] | None = None

    def __init__(self, temperature: float, alpha: float) -> None:
        super().__init__()
        self.temperature = check_positive("temperature", temperature)
        self.alpha = check_unit_interval("alpha", alpha)

    def extra_repr(self) -> str:
        s = ", ".join(f"{name}={getattr(self, name)!r}" for name in ("temperature", "alpha", *self._shown))
        return s if self.weights is None else f"{s}, weights={self.weights}"


class CohortLoss(_SoftenedKD):
    """DIH cohort distillation; see :func:`kdloss.functional.cohort_kd` for the formula and the two forms.

    Holds the hyper-parameters only (validated here). ``forward`` returns a
    :class:`kdloss.LossParts` (``total`` and the per-teacher parts).

    Args:
        temperature: softening temperature ``T > 0`` (DIH uses 5).
        alpha: the KD weight in ``[0, 1]`` (DIH uses 0.1).
        weights: optional ``K`` non-negative per-teacher weights, not all zero.
        form: ``"authors"`` or ``"normalized"`` (see :func:`kdloss.functional.cohort_kd`).
        reduction: ``"batchmean" | "sum" | "none"``.

    Raises:
        TypeError, ValueError: for a bad hyper-parameter, when the module is built (the checks of
            :func:`kdloss.functional.cohort_kd`); ``forward`` raises what the function raises.

    Example:
        >>> import torch
        >>> loss = CohortLoss(temperature=5.0, alpha=0.1)
        >>> loss
        CohortLoss(temperature=5.0, alpha=0.1, form='authors', reduction='batchmean')
        >>> total, parts = loss(torch.zeros(2, 10), torch.zeros(4, 2, 10), torch.tensor([0, 1]))
        >>> round(total.item(), 4)  # 4 teachers, CE counted 4 times: 4 * 0.9 * ln(10)
        8.2893
    """

    _shown = ("form", "reduction")

    def __init__(
        self,
        temperature: float = 1.0,
        *,
        alpha: float = 0.5,
        weights: Sequence[float] | None = None,
        form: CohortForm = "authors",
        reduction: Reduction = "batchmean",
    ) -> None:
        super().__init__(temperature, alpha)
        if form not in COHORT_FORMS:
            raise ValueError(f"form must be one of {', '.join(map(repr, COHORT_FORMS))}, got {form!r}")
        self.form: CohortForm = form
        self.reduction: Reduction = check_reduction(reduction, COHORT_REDUCTIONS)
        self.weights = check_weights(weights, len(weights), "teacher") if weights is not None else None

    def forward(self, student_logits: Tensor, teacher_logits: TeacherLogits, labels: Tensor) -> LossParts:
        return cohort_kd(
            student_logits,
            teacher_logits,
            labels,
            temperature=self.temperature,
            alpha=self.alpha,
            weights=self.weights,
            form=self.form,
            reduction=self.reduction,
        )


class MultiHeadKDLoss(_SoftenedKD):
    """MHKD over paired student/teacher heads; see :func:`kdloss.functional.paired_head_kd`.

    Args:
        temperature: ``T > 0``.
        alpha: KD weight in ``[0, 1]``.
        weights: optional ``K`` non-negative per-pair weights.
        reduction: ``"batchmean" | "sum" | "none"``.

    Raises:
        TypeError, ValueError: for a bad hyper-parameter, when the module is built (the checks of
            :func:`kdloss.functional.paired_head_kd`); ``forward`` raises what the function raises.

    Example:
        >>> import torch
        >>> MultiHeadKDLoss(temperature=4.0, alpha=0.9)(torch.zeros(3, 2, 10), torch.zeros(3, 2, 10),
        ...                                             torch.tensor([0, 1])).parts["kd/2"]
        tensor(0.)
    """

    _shown = ("reduction",)

    def __init__(
        self,
        temperature: float = 1.0,
        *,
        alpha: float = 0.5,
        weights: Sequence[float] | None = None,
        reduction: Reduction = "batchmean",
    ) -> None:
        super().__init__(temperature, alpha)
        self.reduction: Reduction = check_reduction(reduction, COHORT_REDUCTIONS)
        self.weights = check_weights(weights, len(weights), "head pair") if weights is not None else None

    def forward(self, student_logits: TeacherLogits, teacher_logits: TeacherLogits, labels: Tensor) -> LossParts:
        return paired_head_kd(
            student_logits,
            teacher_logits,
            labels,
            temperature=self.temperature,
            alpha=self.alpha,
            weights=self.weights,
            reduction=self.reduction,
        )


class TOFDLoss(_SoftenedKD):
    """TOFD, kdloss's variant: paired-head KD, feature MSE, orthogonality; see :func:`kdloss.functional.tofd_loss`.

    The DIH authors' TOFD is :class:`TOFDAuthorsLoss`; ``tofd_loss``'s docstring maps one onto the other.

    Stateless: the student's adapters are the caller's (they belong with the student, in its
    optimiser); pass their weights to :meth:`forward` for the orthogonality term.

    Args:
        temperature: ``T > 0``.
        alpha: KD weight in ``[0, 1]``.
        beta: weight of the feature term (>= 0).
        gamma: weight of the orthogonality penalty (>= 0).

    Raises:
        TypeError, ValueError: for a bad hyper-parameter, when the module is built (the checks of
            :func:`kdloss.functional.tofd_loss`); ``forward`` raises what the function raises.

    Example:
        >>> import torch
        >>> TOFDLoss(temperature=3.0, alpha=0.5, beta=0.05, gamma=0.01)
        TOFDLoss(temperature=3.0, alpha=0.5, beta=0.05, gamma=0.01)
    """

    _shown = ("beta", "gamma")

    def __init__(self, temperature: float = 1.0, *, alpha: float = 0.5, beta: float = 0.05, gamma: float = 0.0) -> None:
        super().__init__(temperature, alpha)
        self.beta = check_nonnegative("beta", beta)
        self.gamma = check_nonnegative("gamma", gamma)

    def forward(
        self,
        student_logits: TeacherLogits,
        teacher_logits: TeacherLogits,
        labels: Tensor,
        student_features: Sequence[Tensor],
        teacher_features: Sequence[Tensor],
        adapter_weights: Sequence[Tensor] = (),
    ) -> LossParts:
        return tofd_loss(
            student_logits,
            teacher_logits,
            labels,
            student_features,
            teacher_features,
            adapter_weights=adapter_weights,
            temperature=self.temperature,
            alpha=self.alpha,
            beta=self.beta,
            gamma=self.gamma,
        )


class TOFDAuthorsLoss(nn.Module):
    """The DIH authors' TOFD, with their epoch-dependent temperature; see :func:`kdloss.functional.tofd_authors_loss`.

    ``forward(..., epoch=e)`` computes the temperature with
    :func:`kdloss.functional.tofd_temperature` (``1 + t / horizon * (e + 1)``, ``e`` 0-based) and
    calls :func:`kdloss.functional.tofd_authors_loss`. Stateless: the bias-free linear adapters
    (``nn.Linear(D_s, D_t, bias=False)``, one per pair, even at equal widths) belong to the
    student and its optimiser; pass their weights to :meth:`forward`.

    Args:
        feature_weight: weight of the unsquared feature L2 term (the authors' ``--alpha``, 0.05).
        orth_weight: weight of the orthogonality term (the authors' ``--beta``, 0.03).
        t: the temperature schedule's scale (the authors' ``--t``, 3.0).
        horizon: the schedule's horizon in epochs (250 in their code).

    Raises:
        TypeError, ValueError: for a bad hyper-parameter, when the module is built;
            ``forward`` raises what :func:`kdloss.functional.tofd_authors_loss` and
            :func:`kdloss.functional.tofd_temperature` raise.

    Example:
        >>> import torch
        >>> crit = TOFDAuthorsLoss()
        >>> crit
        TOFDAuthorsLoss(feature_weight=0.05, orth_weight=0.03, t=3.0, horizon=250.0)
        >>> s, t, y = torch.zeros(2, 4, 10), torch.zeros(2, 4, 10), torch.tensor([0, 1, 2, 3])
        >>> out = crit(s, t, y, [torch.ones(4, 8)] * 2, [torch.ones(4, 8)] * 2, [torch.eye(8)] * 2, epoch=0)
        >>> sorted(out.parts)
        ['ce/0', 'ce/1', 'feat/0', 'feat/1', 'orth', 'soft_ce/0', 'soft_ce/1', 'total']
    """

    def __init__(
        self, *, feature_weight: float = 0.05, orth_weight: float = 0.03, t: float = 3.0, horizon: float = 250.0
    ) -> None:
        super().__init__()
        self.feature_weight = check_nonnegative("feature_weight", feature_weight)
        self.orth_weight = check_nonnegative("orth_weight", orth_weight)
        self.t = check_positive("t", t)
        self.horizon = check_positive("horizon", horizon)

    def forward(
        self,
        student_logits: TeacherLogits,
        teacher_logits: TeacherLogits,
        labels: Tensor,
        student_features: Sequence[Tensor],
        teacher_features: Sequence[Tensor],
        adapter_weights: Sequence[Tensor],
        *,
        epoch: int,
    ) -> LossParts:
        return tofd_authors_loss(
            student_logits,
            teacher_logits,
            labels,
            student_features,
            teacher_features,
            adapter_weights,
            temperature=tofd_temperature(epoch, t=self.t, horizon=self.horizon),
            feature_weight=self.feature_weight,
            orth_weight=self.orth_weight,
        )

    def extra_repr(self) -> str:
        return (
            f"feature_weight={self.feature_weight}, orth_weight={self.orth_weight}, t={self.t}, horizon={self.horizon}"
        )


class SelfDistillationLoss(_SoftenedKD):
    """Self-distillation over early exits; see :func:`kdloss.functional.self_distillation_loss`.

    Args:
        temperature: ``T > 0``.
        alpha: KD weight in ``[0, 1]``.
        beta: feature-hint weight (>= 0).

    Raises:
        TypeError, ValueError: for a bad hyper-parameter, when the module is built (the checks of
            :func:`kdloss.functional.self_distillation_loss`); ``forward`` raises what the function raises.

    Example:
        >>> import torch
        >>> SelfDistillationLoss(temperature=3.0, alpha=0.3, beta=0.03)
        SelfDistillationLoss(temperature=3.0, alpha=0.3, beta=0.03)
    """

    _shown = ("beta",)

    def __init__(self, temperature: float = 3.0, *, alpha: float = 0.3, beta: float = 0.03) -> None:
        super().__init__(temperature, alpha)
        self.beta = check_nonnegative("beta", beta)

    def forward(
        self,
        exit_logits: TeacherLogits,
        final_logits: Tensor,
        labels: Tensor,
        exit_features: Sequence[Tensor] | None = None,
        final_feature: Tensor | None = None,
    ) -> LossParts:
        return self_distillation_loss(
            exit_logits,
            final_logits,
            labels,
            exit_features=exit_features,
            final_feature=final_feature,
            temperature=self.temperature,
            alpha=self.alpha,
            beta=self.beta,
        )
