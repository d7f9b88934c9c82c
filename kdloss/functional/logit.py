"""Logit-based methods beyond Hinton's KD: decoupled KD (DKD) and DIST."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdloss._numerics import compute_dtype, detached, in_dtype
from kdloss._validate import (
    Reduction,
    ShapeError,
    check_class_labels,
    check_nonnegative,
    check_pair,
    check_positive,
    check_reduction,
)
from kdloss.functional._autograd import dkd

__all__ = ["dist_loss", "dkd_loss", "dkd_warmup_factor"]


def _check_logit_pair(student_logits: Tensor, teacher_logits: Tensor, method: str) -> None:
    check_pair(
        "student_logits",
        student_logits,
        "teacher_logits",
        teacher_logits,
        hint=f"{method} compares distributions over the same classes",
    )
    if student_logits.ndim != 2:
        raise ShapeError(f"student_logits must be (B, C) logits, got shape {tuple(student_logits.shape)}")
    if student_logits.shape[1] < 2:
        raise ShapeError(
            f"{method} needs at least 2 classes, got student_logits of shape {tuple(student_logits.shape)}"
        )


def dkd_warmup_factor(epoch: float | None, warmup_epochs: float) -> float:
    """DKD's linear warm-up weight ``min(epoch / warmup_epochs, 1)``; 1 when ``warmup_epochs == 0``.

    Args:
        epoch: the current (0-based, possibly fractional) epoch; required when ``warmup_epochs > 0``.
        warmup_epochs: length of the linear ramp (mdistiller uses 20 on CIFAR-100); 0 disables it.

    Raises:
        ValueError: if ``warmup_epochs < 0``, ``epoch < 0``, or ``epoch`` is missing while a warm-up is set.

    Example:
        >>> dkd_warmup_factor(5, 20)
        0.25
        >>> dkd_warmup_factor(None, 0)
        1.0
    """
    warm = check_nonnegative("warmup_epochs", warmup_epochs)
    if warm == 0:
        return 1.0
    if epoch is None:
        raise ValueError(f"epoch is required when warmup_epochs > 0 (got warmup_epochs={warmup_epochs!r})")
    ep = check_nonnegative("epoch", epoch)
    return min(ep / warm, 1.0)


def dkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    reduction: Reduction = "batchmean",
    epoch: float | None = None,
    warmup_epochs: float = 0.0,
) -> Tensor:
    r"""Decoupled knowledge distillation: target-class (TCKD) and non-target-class (NCKD) terms.

    With :math:`p = \mathrm{softmax}(z_t / T)`, :math:`q = \mathrm{softmax}(z_s / T)` and target
    class :math:`y`, the binary distributions are :math:`b = (p_y, 1 - p_y)`,
    :math:`b^s = (q_y, 1 - q_y)`, and :math:`\hat p, \hat q` are the distributions over the
    :math:`C - 1` non-target classes (softmax of the logits with class :math:`y` removed):

    .. math::

        \ell = w \, T^2 \left[\alpha\, \mathrm{KL}(b \,\|\, b^s)
        + \beta\, \mathrm{KL}(\hat p \,\|\, \hat q)\right],
        \qquad w = \min(\text{epoch} / \text{warmup\_epochs},\ 1).

    Hinton's KD decomposes as :math:`\mathrm{KL}(p\|q) = \mathrm{TCKD} + (1 - p_y)\,\mathrm{NCKD}`;
    DKD replaces the coupling weight :math:`1 - p_y` by the free :math:`\beta`. All log-probabilities
    come from log-sum-exp in float32 (float64 stays float64): the binary terms never take
    ``log(1 - p)`` of a rounded probability, and with 2 classes the non-target distribution has
    one class and NCKD is exactly 0 (no ``0 * log 0`` NaN, in values or gradients). A ``-inf``
    logit (a masked class) contributes 0 where the teacher gives it probability 0; every row
    needs at least one finite non-target logit. The teacher is detached. This equals mdistiller's
    implementation (which masks the target logit with ``-1000`` and takes ``log`` of
    probabilities) up to rounding.

    Reductions: ``"none"`` gives the per-sample loss ``(B,)``; ``"batchmean"`` (default, as in
    mdistiller) and ``"mean"`` its mean over the batch; ``"sum"`` its sum.

    Args:
        student_logits: ``(B, C)`` student logits, ``C >= 2``.
        teacher_logits: ``(B, C)`` teacher logits; detached inside.
        labels: ``(B,)`` integer ground-truth classes in ``[0, C)``.
        alpha: weight of TCKD (1.0 in the paper).
        beta: weight of NCKD (8.0 for most CIFAR-100 teacher-student pairs in mdistiller).
        temperature: softening temperature ``T > 0`` (4 on CIFAR-100).
        reduction: ``"none" | "mean" | "batchmean" | "sum"``.
        epoch: current epoch for the warm-up; needed only when ``warmup_epochs > 0``.
        warmup_epochs: linear warm-up length (mdistiller: 20); 0 (default) disables it.

    Raises:
        TypeError: non-floating logits, non-integer labels.
        ShapeError: logits not ``(B, C)`` with ``C >= 2`` or of different shapes, labels not ``(B,)``.
        ValueError: a label outside ``[0, C)`` (checked for CPU tensors only, outside
            ``torch.compile``: on CUDA the check would wait for the device every step),
            ``temperature <= 0``, negative ``alpha``/``beta``, a bad warm-up or ``reduction``,
            different devices.

    Zhao, Cui, Song, Qiu & Liang, *Decoupled Knowledge Distillation*, CVPR 2022.

    Example:
        >>> import torch
        >>> from kdloss.functional import dkd_loss
        >>> s = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.0]])
        >>> t = torch.tensor([[3.0, 0.0, -2.0], [0.0, 2.0, 1.0]])
        >>> dkd_loss(s, t, torch.tensor([0, 1]), alpha=1.0, beta=8.0, temperature=4.0)
        tensor(0.8066)
        >>> dkd_loss(t, t, torch.tensor([0, 1]))
        tensor(0.)
    """
    _check_logit_pair(student_logits, teacher_logits, "dkd_loss")
    check_class_labels(labels, student_logits)  # the range on CPU only: no synchronisation on CUDA
    check_positive("temperature", temperature)
    check_nonnegative("alpha", alpha)
    check_nonnegative("beta", beta)
    check_reduction(reduction)
    weight = dkd_warmup_factor(epoch, warmup_epochs)

    # one autograd.Function, forward and analytic backward (kdloss.functional._autograd)
    return dkd(
        student_logits,
        teacher_logits,
        labels.long(),
        temperature=temperature,
        alpha=alpha,
        beta=beta,
        weight=weight,
        reduction=reduction,
    )


def dist_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    beta: float = 1.0,
    gamma: float = 1.0,
    temperature: float = 1.0,
    eps: float = 1e-8,
) -> Tensor:
    r"""DIST: match inter-class and intra-class relations with Pearson correlation.

    With :math:`Y^s = \mathrm{softmax}(Z_s / T)` and :math:`Y^t = \mathrm{softmax}(Z_t / T)`
    (``(B, C)``, row-wise) and :math:`d_p(u, v) = 1 - \rho_p(u, v)` the Pearson distance,

    .. math::

        \mathcal{L} = \beta\, T^2\, \frac{1}{B} \sum_{i=1}^{B} d_p(Y^s_{i,:}, Y^t_{i,:})
        + \gamma\, T^2\, \frac{1}{C} \sum_{j=1}^{C} d_p(Y^s_{:,j}, Y^t_{:,j}),

    where :math:`\rho_p(u, v) = \frac{(u - \bar u)^\top (v - \bar v)}
    {\lVert u - \bar u \rVert\, \lVert v - \bar v \rVert + \epsilon}`. The first (inter-class)
    term compares each sample's class ranking, the second (intra-class) term compares how each
    class's probability varies over the batch. ``eps`` follows the authors' code; ``eps=0`` gives
    the paper's exact correlation (a constant row, whose correlation is undefined, counts as 0).
    Computed in float32 (float64 stays float64), teacher detached.

    Reductions: none. The intra-class term couples the whole batch, so the result is a scalar
    (the normalisations above: mean over samples and mean over classes).

    Args:
        student_logits: ``(B, C)`` student logits, ``B >= 2``, ``C >= 2``.
        teacher_logits: ``(B, C)`` teacher logits; detached inside.
        beta: weight of the inter-class term (1 in the paper).
        gamma: weight of the intra-class term (1 in the paper).
        temperature: ``T > 0`` (1 in the paper's ImageNet setting; CIFAR recipes use larger ``T``).
        eps: added to the correlation's denominator, ``>= 0``.

    Raises:
        TypeError: non-floating logits.
        ShapeError: logits not ``(B, C)``, of different shapes, ``B < 2`` or ``C < 2``.
        ValueError: ``temperature <= 0``, negative ``beta``/``gamma``/``eps``, different devices.

    Huang, You, Wang, Qian & Xu, *Knowledge Distillation from A Stronger Teacher*, NeurIPS 2022.

    Example:
        >>> import torch
        >>> from kdloss.functional import dist_loss
        >>> s = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.0]])
        >>> t = torch.tensor([[3.0, 0.0, -2.0], [0.0, 2.0, 1.0]])
        >>> dist_loss(s, t)
        tensor(0.0216)
        >>> dist_loss(t, t).abs() < 1e-6
        tensor(True)
    """
    _check_logit_pair(student_logits, teacher_logits, "dist_loss")
    if student_logits.shape[0] < 2:
        raise ShapeError(
            "dist_loss's intra-class term needs a batch of at least 2 samples, "
            f"got student_logits of shape {tuple(student_logits.shape)}"
        )
    check_positive("temperature", temperature)
    check_nonnegative("beta", beta)
    check_nonnegative("gamma", gamma)
    check_nonnegative("eps", eps)
    dtype = compute_dtype(student_logits, teacher_logits)
    ys = F.softmax(in_dtype(student_logits, dtype) / temperature, dim=1)
    with torch.no_grad():
        yt = F.softmax(in_dtype(detached(teacher_logits), dtype) / temperature, dim=1)
    # 1 - mean correlation, over the rows (inter-class) and over the columns (intra-class)
    inter = _mean_pearson(ys, yt, eps, 1)
    intra = _mean_pearson(ys, yt, eps, 0)
    t2 = temperature**2
    loss: Tensor = torch.add(inter * (-beta * t2), intra, alpha=-gamma * t2).add_((beta + gamma) * t2)
    return loss


def _mean_pearson(a: Tensor, b: Tensor, eps: float, dim: int) -> Tensor:
    """The mean Pearson correlation of ``a``'s and ``b``'s slices along ``dim`` (``b`` without gradient).

    A constant slice (a uniform softmax) has no correlation: with ``eps = 0`` its ``0 / 0`` is
    taken as 0, the value any ``eps > 0`` gives, instead of NaN (in the value and in the gradient).
    """
    a = a - a.mean(dim=dim, keepdim=True)
    with torch.no_grad():
        b = b - b.mean(dim=dim, keepdim=True)
        nb = torch.linalg.vector_norm(b, dim=dim)
    denom = torch.linalg.vector_norm(a, dim=dim) * nb
    corr: Tensor = (a * b).sum(dim=dim) / (denom.add_(eps) if eps > 0 else torch.where(denom > 0, denom, 1.0))
    return corr.mean()
