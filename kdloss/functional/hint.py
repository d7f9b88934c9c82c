"""FitNets hints (Romero et al., 2015) and the cosine hidden-representation loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdloss._numerics import compute_dtype, detached, in_dtype, reduce_loss
from kdloss._validate import (
    Reduction,
    ShapeError,
    check_float,
    check_positive,
    check_reduction,
    check_same_device,
    check_same_shape,
)

__all__ = ["cosine_hidden_loss", "hint_loss"]

_mse = torch._C._nn.mse_loss


def _pair(name_s: str, student: Tensor, name_t: str, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """Validate a student/teacher feature pair and return them in a common float32+ dtype."""
    check_float(name_s, student)
    check_float(name_t, teacher)
    check_same_device(**{name_s: student, name_t: teacher})
    for name, t in ((name_s, student), (name_t, teacher)):
        if t.ndim < 2:
            raise ShapeError(f"{name} must have a batch and at least one feature dimension, got shape {tuple(t.shape)}")
    dtype = compute_dtype(student, teacher)
    return in_dtype(student, dtype), in_dtype(detached(teacher), dtype)


def hint_loss(student_feature: Tensor, teacher_feature: Tensor, *, reduction: Reduction = "mean") -> Tensor:
    r"""FitNets hint: squared error between the (adapted) student feature and the teacher feature.

    .. math::

        \ell_b = \frac{1}{D} \sum_{d} \big(r(f_s)_{b,d} - f_{t\,b,d}\big)^2

    where :math:`r` is the adapter (regressor) the caller applies to the student feature first,
    and :math:`D` is the number of elements per sample. The teacher is detached.

    Reductions: ``"none"`` gives :math:`\ell_b` per sample, shape ``(B,)``; ``"mean"`` (default)
    the mean over every element, which is :func:`torch.nn.functional.mse_loss`; ``"sum"`` the
    sum of squared errors; ``"batchmean"`` that sum divided by ``B``.

    Romero et al., *FitNets: Hints for Thin Deep Nets*, ICLR 2015.

    Args:
        student_feature: ``(B, *)`` student feature, already passed through its adapter.
        teacher_feature: teacher feature of the same shape.
        reduction: ``"none" | "mean" | "batchmean" | "sum"``.

    Raises:
        ShapeError: if the shapes differ; the message says to map the student with an adapter
            (:func:`kdloss.adapter_for` builds one from two example tensors).
        TypeError: for non-floating-point features. ValueError: for different devices or an
            unknown reduction.

    Example:
        >>> import torch
        >>> from kdloss.functional import hint_loss
        >>> hint_loss(torch.ones(2, 4, 3, 3), torch.zeros(2, 4, 3, 3))
        tensor(1.)
    """
    s, t = _pair("student_feature", student_feature, "teacher_feature", teacher_feature)
    check_reduction(reduction)
    check_same_shape(
        "student_feature (after its adapter)",
        s,
        "teacher_feature",
        t,
        hint="map the student's feature to the teacher's shape with an adapter, "
        "e.g. kdloss.adapter_for(student_feature, teacher_feature)",
    )
    if s.numel() == 0:  # an empty batch (or no features): 0, not mse_loss's NaN
        zero = s.sum(tuple(range(1, s.ndim))) * 0.0
        return zero if reduction == "none" else zero.sum()
    # One fused ATen kernel each way (mse_loss and its backward), as nn.MSELoss; the shapes are checked
    # above, so the binding is called directly (F.mse_loss's Python wrapper costs as much as the
    # kernel on small features). Its reduction codes: 0 none, 1 mean, 2 sum.
    if reduction == "mean":
        return _mse(s, t, 1)  # type: ignore[arg-type]
    if reduction == "none":
        return _mse(s, t, 0).flatten(1).mean(1)  # type: ignore[arg-type]
    total = _mse(s, t, 2)  # type: ignore[arg-type]
    return total if reduction == "sum" else total / s.shape[0]


def cosine_hidden_loss(
    student_hidden: Tensor, teacher_hidden: Tensor, *, reduction: Reduction = "mean", eps: float | None = None
) -> Tensor:
    r"""One minus the cosine similarity of flattened student and teacher representations.

    With the default ``eps=None`` this is exactly :class:`torch.nn.CosineEmbeddingLoss` with
    target :math:`+1`, the hidden-representation loss of PyTorch's knowledge-distillation
    tutorial, including its handling of all-zero rows (a constant :math:`10^{-12}` added to each
    squared norm):

    .. math::

        \ell_b = 1 - \frac{\langle h_{s,b}, h_{t,b} \rangle}
        {\sqrt{(\lVert h_{s,b} \rVert^2 + 10^{-12})\,(\lVert h_{t,b} \rVert^2 + 10^{-12})}} .

    With a number ``eps``, each norm is instead bounded below by ``eps``, as in
    :func:`torch.nn.functional.cosine_similarity`:
    :math:`\ell_b = 1 - \langle h_s, h_t \rangle / (\max(\lVert h_s \rVert, \epsilon)
    \max(\lVert h_t \rVert, \epsilon))`. Both give a loss of 1 for an all-zero row; its
    gradient has size about :math:`10^{6}` with ``None`` (as torch's loss) and about
    :math:`1/\epsilon` with a number (:math:`10^8` for ``eps=1e-8``; ``eps=1e-6`` matches torch's
    size there). For rows of norm well above ``eps`` the two agree to rounding.

    Features are flattened from dimension 1; the teacher is detached.

    Reductions: ``"none"`` per sample ``(B,)``; ``"mean"`` (default) and ``"batchmean"`` the
    mean over the batch (one value per sample, so they agree); ``"sum"`` the sum.

    Args:
        student_hidden: ``(B, *)`` student representation (after any adapter or pooling).
        teacher_hidden: ``(B, *)`` teacher representation with the same number of elements.
        reduction: ``"none" | "mean" | "batchmean" | "sum"``.
        eps: ``None`` (default) for :class:`torch.nn.CosineEmbeddingLoss`'s formula, or a lower
            bound > 0 of each norm (the :func:`torch.nn.functional.cosine_similarity` form).

    Raises:
        ShapeError: if the flattened sizes differ (pool the larger one first, e.g. with
            :class:`kdloss.PoolAdapter`). TypeError/ValueError: as :func:`hint_loss`, and for an
            ``eps`` that is neither ``None`` nor a finite number > 0.

    Example:
        >>> import torch
        >>> from kdloss.functional import cosine_hidden_loss
        >>> cosine_hidden_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]]))
        tensor(1.)
        >>> cosine_hidden_loss(torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 2.0]]), eps=1e-8)
        tensor(1.)
    """
    s, t = _pair("student_hidden", student_hidden, "teacher_hidden", teacher_hidden)
    check_reduction(reduction)
    if eps is not None:
        check_positive("eps", eps)
    s, t = s.flatten(1), t.flatten(1)
    check_same_shape(
        "student_hidden (flattened)",
        s,
        "teacher_hidden (flattened)",
        t,
        hint="pool or project one side first, e.g. kdloss.PoolAdapter",
    )
    if eps is None:  # torch.nn.CosineEmbeddingLoss: 1e-12 added to each squared norm
        denom = ((s * s).sum(dim=1) + _COSINE_EMBEDDING_EPS) * ((t * t).sum(dim=1) + _COSINE_EMBEDDING_EPS)
        per_row = 1.0 - (s * t).sum(dim=1) / denom.sqrt()
    else:
        per_row = 1.0 - F.cosine_similarity(s, t, dim=1, eps=eps)
    return reduce_loss(per_row, reduction, rows=s.shape[0])


_COSINE_EMBEDDING_EPS = 1e-12  # the EPSILON of ATen's cosine_embedding_loss
