"""Hinton's full distillation objective: soft-target KL mixed with the hard-label cross-entropy."""

from __future__ import annotations

import torch
from torch import Tensor

from kdloss import kernels as _kernels
from kdloss._validate import (
    Reduction,
    ShapeError,
    check_int,
    check_integer,
    check_pair,
    check_positive,
    check_reduction,
    check_same_device,
    check_unit_interval,
)
from kdloss._validate import check_row_tensor as _check_row_tensor
from kdloss.functional._autograd import kl_family

__all__ = ["kd_ce_loss"]

KD_CE_REDUCTIONS: tuple[str, ...] = ("none", "sum", "batchmean")
"""The reductions :func:`kd_ce_loss` accepts (and :class:`kdloss.KDCELoss`)."""
_KD_CE_REDUCTIONS = KD_CE_REDUCTIONS


def kd_ce_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    alpha: float = 0.5,
    temperature: float = 1.0,
    reduction: Reduction = "batchmean",
    mask: Tensor | None = None,
    ignore_index: int = -100,
) -> Tensor:
    r"""Soft-target KL and hard-label cross-entropy in one call: Hinton's distillation objective.

    With :math:`p = \mathrm{softmax}(z_t / T)`, :math:`q = \mathrm{softmax}(z_s / T)` and the
    label :math:`y`, the unreduced loss of one row is

    .. math::

        \ell = \alpha\, T^2 \sum_c p_c (\log p_c - \log q_c)
               + (1 - \alpha) \left(\log \sum_c e^{z_{s,c}} - z_{s,y}\right),

    i.e. ``alpha * soft_kl(..., reduction="none") + (1 - alpha) * cross_entropy(..., reduction="none")``
    (the cross-entropy at temperature 1, on the raw student logits), computed in float32 whatever the
    input dtype, teacher detached. On CUDA with Triton installed it runs as one fused kernel that
    reads each logit tensor twice and writes the gradient once (see :mod:`kdloss.kernels`); elsewhere
    it runs the eager PyTorch path; both give the same numbers within float32 rounding.

    ``alpha=1`` is exactly :func:`~kdloss.functional.soft_kl` and ``alpha=0`` the cross-entropy
    alone: the term with weight 0 is not computed (so an infinite CE cannot turn into NaN).

    Rows that do not count (value 0, left out of ``N``): positions where ``mask`` is ``False``,
    positions whose label is ``ignore_index``, rows whose student or teacher logits are all ``-inf``.

    Reductions (``N`` = the number of rows that count):

    - ``"none"``: one value per row, shape ``(B,)`` or ``(B, L)``;
    - ``"sum"``: the sum over rows;
    - ``"batchmean"`` (default): the sum divided by ``N``; this is :func:`torch.nn.functional.cross_entropy`'s
      ``mean`` for the CE term and ``kl_div``'s ``batchmean`` (per token for ``(B, L, C)``) for the KL term.

    Args:
        student_logits: ``(B, C)`` or ``(B, L, C)`` student logits (any leading dims).
        teacher_logits: teacher logits of the same shape; detached inside.
        labels: integer class indices (any integer dtype) of the logits' shape without ``C``, in ``[0, C)``
            or ``ignore_index``.
        alpha: weight of the KD term in ``[0, 1]``; ``1 - alpha`` weighs the cross-entropy.
        temperature: softening temperature ``T > 0`` of the KD term.
        reduction: ``"none" | "sum" | "batchmean"``.
        mask: optional bool tensor of the logits' shape without ``C``; ``False`` rows are ignored.
        ignore_index: the label value that marks ignored rows (default -100).

    Shape:
        logits ``(*, C)``, labels and mask ``(*)``; output ``()`` or ``(*)`` for ``"none"``.

    Returns:
        A float32 (float64 for float64 input) scalar, or the per-row losses for ``"none"``.

    Raises:
        TypeError: non-floating logits, non-integer ``labels``, non-bool ``mask``, a non-int ``ignore_index``.
        ShapeError: logits of different shapes or fewer than 2 dims; ``labels``/``mask`` not matching the rows.
        ValueError: ``temperature`` not > 0, ``alpha`` outside ``[0, 1]``, an unknown ``reduction``,
            different devices, or (for CPU tensors outside ``torch.compile``, where the check costs no device
            synchronisation or graph break) a label
            outside ``[0, C)`` that is not ``ignore_index``. On CUDA such a label makes its row's loss NaN.

    Hinton, Vinyals & Dean, *Distilling the Knowledge in a Neural Network*, 2015.

    Example:
        >>> import torch
        >>> from kdloss.functional import kd_ce_loss
        >>> student = torch.tensor([[2.0, 0.5, -1.0]])
        >>> teacher = torch.tensor([[3.0, 0.0, -2.0]])
        >>> kd_ce_loss(student, teacher, torch.tensor([0]), alpha=0.9, temperature=2.0)
        tensor(0.2779)
    """
    check_pair(
        "student_logits",
        student_logits,
        "teacher_logits",
        teacher_logits,
        hint="the KD term compares two distributions",
    )
    check_integer("labels", labels)
    check_same_device(student_logits=student_logits, labels=labels)
    if student_logits.ndim < 2:
        raise ShapeError(
            "student_logits must have at least 2 dimensions, (B, C) or (B, L, C), "
            f"got shape {tuple(student_logits.shape)}"
        )
    check_positive("temperature", temperature)
    check_unit_interval("alpha", alpha)
    check_reduction(reduction, _KD_CE_REDUCTIONS)
    check_int("ignore_index", ignore_index)
    rows_shape = student_logits.shape[:-1]
    c = student_logits.shape[-1]
    _check_row_tensor("labels", labels, rows_shape, student_logits.device)
    if mask is not None:
        _check_row_tensor("mask", mask, rows_shape, student_logits.device)
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got dtype {mask.dtype}")
    # The label range is checked where reading it costs no device synchronisation or graph break
    # (CPU, eager): one min/max; the exact check only when something lies outside [0, C).
    plain_labels = False
    if labels.device.type == "cpu" and labels.numel() > 0 and not torch.compiler.is_compiling():
        lo, hi = torch.aminmax(labels)
        if int(lo) < 0 or int(hi) >= c:
            bad = (labels != ignore_index) & ((labels < 0) | (labels >= c))
            if bool(bad.any()):
                raise ValueError(
                    f"labels must lie in [0, {c}) or equal ignore_index={ignore_index}, got {labels[bad][0].item()}"
                )
        else:  # every label is a class (none equals an ignore_index outside [0, C))
            plain_labels = mask is None and not 0 <= ignore_index < c
    if labels.dtype != torch.int64:  # any integer dtype (int32, uint8...): cross_entropy and the kernel take int64
        labels = labels.long()

    if _kernels.use_fused(student_logits, teacher_logits):  # CUDA + Triton only
        # one launch: the rows and, unless reduction="none", their reduction (None: it failed, eager)
        fused = _kernels.run_guarded(
            "soft_kl",
            student_logits,
            teacher_logits,
            _kernels.fused_kd_loss,
            student_logits,
            teacher_logits,
            temperature=temperature,
            reduction=reduction,
            mask=mask,
            labels=labels,
            ignore_index=ignore_index,
            kl_weight=alpha,
            ce_weight=1.0 - alpha,
        )
        if fused is not None:
            return fused

    # The eager path: one autograd.Function, forward and analytic backward (kdloss.functional._autograd).
    # alpha = 1 is pure KD and alpha = 0 pure CE: the other term is left out, not multiplied by 0
    # (0 * inf would be NaN for a label whose student logit is -inf).
    row_ok: Tensor | None = None
    if not plain_labels:
        row_ok = labels != ignore_index
        if mask is not None:
            row_ok = row_ok & mask
    return kl_family(
        student_logits,
        teacher_logits,
        temperature=temperature,
        reduction=reduction,
        row_ok=row_ok,
        labels=labels,
        kl_weight=alpha,
        ce_weight=1.0 - alpha,
        plain_labels=plain_labels,
    )
