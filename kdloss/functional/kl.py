"""Soft-target KL divergence (Hinton et al., 2015) and its reverse and Jensen-Shannon variants."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from kdloss import kernels as _kernels
from kdloss._numerics import compute_dtype
from kdloss._validate import (
    Reduction,
    ShapeError,
    check_float,
    check_int,
    check_integer,
    check_pair,
    check_positive,
    check_reduction,
    check_unit_interval,
    renamed_argument,
    warn_if_swapped,
)
from kdloss._validate import check_row_tensor as _check_row_tensor
from kdloss.functional._autograd import kl_family

__all__ = ["Direction", "log_probs", "soft_kl"]

Direction = Literal["forward", "reverse", "jsd"]
"""``"forward"``: KL(p_teacher || p_student), Hinton's KD. ``"reverse"``: KL(p_student ||
p_teacher), mode-seeking. ``"jsd"``: the generalised Jensen-Shannon divergence with weight
``jsd_weight`` on the teacher."""

_DIRECTIONS: tuple[str, ...] = ("forward", "reverse", "jsd")


def log_probs(logits: Tensor, temperature: float) -> Tensor:
    """``log_softmax(logits / temperature)`` over the last dimension, in float32 or wider.

    Args:
        logits: ``(..., C)`` floating-point logits of any precision.
        temperature: the softening temperature ``T > 0``.

    Returns:
        ``(..., C)`` log-probabilities in float32 (float64 for float64 input).

    Example:
        >>> import torch
        >>> log_probs(torch.tensor([[0.0, 0.0]], dtype=torch.bfloat16), 2.0).exp()
        tensor([[0.5000, 0.5000]])
    """
    check_float("logits", logits)
    check_positive("temperature", temperature)
    return F.log_softmax(logits.to(compute_dtype(logits)) / temperature, dim=-1)


def soft_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    reduction: Reduction = "batchmean",
    direction: Direction = "forward",
    jsd_weight: float | None = None,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    ignore_index: int = -100,
    beta: float | None = None,
) -> Tensor:
    r"""Temperature-softened KL divergence between teacher and student, times :math:`T^2`.

    With :math:`p = \mathrm{softmax}(z_t / T)` (teacher) and :math:`q = \mathrm{softmax}(z_s / T)`
    (student), the unreduced loss of one row (sample, or position of a sequence) is

    .. math::

        \ell_{\text{forward}} = T^2 \sum_c p_c (\log p_c - \log q_c), \qquad
        \ell_{\text{reverse}} = T^2 \sum_c q_c (\log q_c - \log p_c),

    .. math::

        \ell_{\text{jsd}} = T^2 \left[\beta\, \mathrm{KL}(p \,\|\, m) + (1 - \beta)\,
        \mathrm{KL}(q \,\|\, m)\right], \quad m = \beta p + (1 - \beta) q .

    The :math:`T^2` factor keeps the gradient's magnitude independent of :math:`T`
    (Hinton, Vinyals & Dean, *Distilling the Knowledge in a Neural Network*, 2015). The
    log-softmax runs in float32 whatever the input dtype (float64 stays float64), the teacher
    is detached and never receives a gradient, and classes of probability 0 (``-inf`` logits)
    contribute 0 rather than NaN.

    Rows that do not count: positions where ``mask`` is ``False``, positions whose ``labels``
    equal ``ignore_index``, and rows whose student or teacher logits are all ``-inf`` (there is
    no distribution to compare). They contribute 0 and are left out of the counts below, so a
    fully masked batch gives a loss of 0, not NaN.

    Reductions (``N`` = the number of rows that count, ``C`` = the class count):

    - ``"none"``: one value per row, shape ``(B,)`` or ``(B, L)``; rows that do not count are 0;
    - ``"sum"``: the sum over rows;
    - ``"batchmean"`` (default): the sum divided by ``N``. For ``(B, C)`` logits ``N = B`` and
      this is :func:`torch.nn.functional.kl_div`'s ``batchmean``; for ``(B, L, C)`` it divides
      by the number of counted positions (tokens), **not** by ``B`` as ``kl_div`` would;
    - ``"mean"``: the sum divided by ``N * C`` (``kl_div``'s element-wise ``mean``).

    Args:
        student_logits: ``(B, C)`` or ``(B, L, C)`` (any number of leading dims) student logits.
        teacher_logits: teacher logits of the same shape; detached inside.
        temperature: softening temperature ``T > 0``.
        reduction: ``"none" | "mean" | "batchmean" | "sum"``.
        direction: ``"forward"`` (default), ``"reverse"`` or ``"jsd"``.
        jsd_weight: the teacher's weight in the JSD mixture, in ``(0, 1)``; only with
            ``direction="jsd"`` (default 0.5 there), an error otherwise.
        mask: optional boolean tensor of the logits' shape without ``C``; ``False`` rows are
            ignored.
        labels: optional integer tensor of the logits' shape without ``C``; rows whose label is
            ``ignore_index`` are ignored.
        ignore_index: the label value that marks ignored rows (default -100, as in
            :func:`torch.nn.functional.cross_entropy`).
        beta: the former name of ``jsd_weight`` (deprecated: a ``FutureWarning``).

    Returns:
        A float32 (float64 for float64 input) scalar, or the per-row losses for ``"none"``.

    Raises:
        TypeError: if logits are not floating point, ``mask``/``labels`` have the wrong dtype, or
            ``ignore_index`` is not an int.
        ShapeError: if the two logits' shapes differ (batch or class count), if the logits have
            fewer than 2 dimensions, or ``mask``/``labels`` do not match the rows.
        ValueError: for a temperature that is not > 0, an unknown ``reduction``/``direction``,
            ``jsd_weight`` outside ``(0, 1)`` or given without ``direction="jsd"``, different devices.
            TypeError: ``jsd_weight`` and ``beta`` both given.

    Warns:
        UserWarning: when ``teacher_logits`` requires grad and ``student_logits`` does not: the
            arguments are likely swapped, and the loss (the teacher detached) has no gradient.

    Example:
        >>> import torch
        >>> from kdloss.functional import soft_kl
        >>> student = torch.tensor([[2.0, 0.5, -1.0]])
        >>> teacher = torch.tensor([[3.0, 0.0, -2.0]])
        >>> soft_kl(student, teacher, temperature=2.0)
        tensor(0.2820)
        >>> soft_kl(teacher, teacher, temperature=2.0)
        tensor(0.)
    """
    check_pair(
        "student_logits",
        student_logits,
        "teacher_logits",
        teacher_logits,
        hint="soft_kl compares two distributions over the same classes",
    )
    warn_if_swapped("student_logits", student_logits, "teacher_logits", teacher_logits)
    if student_logits.ndim < 2:
        raise ShapeError(
            "student_logits must have at least 2 dimensions, (B, C) or (B, L, C), "
            f"got shape {tuple(student_logits.shape)}"
        )
    check_positive("temperature", temperature)
    check_reduction(reduction)
    if direction not in _DIRECTIONS:
        raise ValueError(f"direction must be one of {', '.join(map(repr, _DIRECTIONS))}, got {direction!r}")
    jsd_weight = renamed_argument("soft_kl", "jsd_weight", jsd_weight, "beta", beta)
    jsd_beta = 0.5
    if direction == "jsd":
        if jsd_weight is not None:
            jsd_beta = check_unit_interval("jsd_weight", jsd_weight, open_ends=True)
    elif jsd_weight is not None:
        raise ValueError(f"jsd_weight is the JSD mixture weight and needs direction='jsd', got direction={direction!r}")
    rows_shape = student_logits.shape[:-1]
    if mask is not None:
        _check_row_tensor("mask", mask, rows_shape, student_logits.device)
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got dtype {mask.dtype}")
    check_int("ignore_index", ignore_index)
    if labels is not None:
        _check_row_tensor("labels", labels, rows_shape, student_logits.device)
        check_integer("labels", labels)

    if direction == "forward" and _kernels.use_fused(student_logits, teacher_logits):  # CUDA + Triton only
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
            elements_per_row=student_logits.shape[-1],
            mask=mask,
            labels=labels,
            ignore_index=ignore_index,
        )
        if fused is not None:
            return fused

    # The eager path: one autograd.Function, forward and analytic backward (kdloss.functional._autograd).
    # Rows that do not count: a False mask, an ignored label, no finite logit on either side.
    row_ok = mask
    if labels is not None:
        kept = labels != ignore_index
        row_ok = kept if row_ok is None else row_ok & kept
    return kl_family(
        student_logits,
        teacher_logits,
        temperature=temperature,
        direction=direction,
        jsd_weight=jsd_beta,
        reduction=reduction,
        row_ok=row_ok,
    )
