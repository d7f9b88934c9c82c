"""Multi-teacher and multi-head distillation: DIH cohorts, MHKD, TOFD and self-distillation.

Every function here returns a :class:`kdloss.LossParts`: the total (with its graph) and a dict
of named, detached parts (one per head) for logging.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from kdloss import kernels as _kernels
from kdloss._numerics import LOG_FLOOR, compute_dtype, in_dtype, reduce_loss
from kdloss._validate import (
    Reduction,
    ShapeError,
    check_class_labels,
    check_float,
    check_nonnegative,
    check_positive,
    check_reduction,
    check_same_device,
    check_unit_interval,
    check_weights,
)
from kdloss.compose import LossParts
from kdloss.functional.hint import hint_loss
from kdloss.functional.kl import soft_kl

__all__ = [
    "CohortForm",
    "TOFDVariant",
    "TeacherLogits",
    "cohort_kd",
    "orthogonality_penalty",
    "paired_head_kd",
    "self_distillation_loss",
    "tofd_authors_loss",
    "tofd_loss",
    "tofd_temperature",
]

TOFDVariant = Literal["kdloss", "authors"]
"""Which TOFD formulation: ``"kdloss"`` (:func:`tofd_loss`: KD + CE mix, MSE features, the squared
penalty on the smaller Gram matrix) or ``"authors"`` (the DIH authors' code:
:func:`tofd_authors_loss`, the unsquared penalty on both Gram matrices)."""

_TOFD_VARIANTS: tuple[str, ...] = ("kdloss", "authors")

CohortForm = Literal["authors", "normalized"]
"""How :func:`cohort_kd` adds up its ``K`` teachers: ``"authors"`` sums ``alpha * KD_k + (1 -
alpha) * CE`` over the teachers, so the cross-entropy counts ``K`` times (the DIH authors'
code); ``"normalized"`` counts the cross-entropy once and averages the KD terms."""

TeacherLogits = Tensor | Sequence[Tensor] | Mapping[str, Tensor]
"""The logits of ``K`` teachers: a stacked ``(K, B, C)`` tensor, a sequence of ``K`` ``(B, C)``
tensors, or a mapping from names (used in the logged parts) to ``(B, C)`` tensors."""

COHORT_FORMS: tuple[str, ...] = ("authors", "normalized")
"""The values of :data:`CohortForm`."""
COHORT_REDUCTIONS: tuple[str, ...] = ("none", "batchmean", "sum")
"""The reductions of the cohort losses (per-row losses: no ``"mean"`` over classes)."""


# -- validation helpers ------------------------------------------------------------------------
def _stack_logits(name: str, logits: TeacherLogits) -> tuple[Tensor, list[str]]:
    """Return ``(K, B, C)`` logits and one name per entry."""
    if isinstance(logits, Tensor):
        check_float(name, logits)
        if logits.ndim != 3:
            raise ShapeError(
                f"{name} must be a (K, B, C) tensor of stacked logits (or a sequence of (B, C) tensors), "
                f"got shape {tuple(logits.shape)}"
            )
        return logits, [str(i) for i in range(logits.shape[0])]
    if isinstance(logits, Mapping):
        names, items = [str(n) for n in logits], list(logits.values())
    elif isinstance(logits, Sequence):
        items = list(logits)
        names = [str(i) for i in range(len(items))]
    else:
        raise TypeError(
            f"{name} must be a (K, B, C) tensor, a sequence or a mapping of (B, C) tensors, got {type(logits).__name__}"
        )
    if not items:
        raise ValueError(f"{name} must hold at least one set of logits, got none")
    first = check_float(f"{name}[{names[0]}]", items[0])
    for n, t in zip(names, items):
        check_float(f"{name}[{n}]", t)
        if t.ndim != 2:
            raise ShapeError(f"{name}[{n}] must be (B, C) logits, got shape {tuple(t.shape)}")
        if t.device != first.device:
            raise ValueError(f"{name}[{n}] must be on the device of {name}[{names[0]}], {first.device}, got {t.device}")
        if t.shape != first.shape:
            _raise_mismatch(f"{name}[{n}]", t.shape, f"{name}[{names[0]}]", first.shape)
    dtype = items[0].dtype
    for t in items[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return torch.stack([t.to(dtype) for t in items]), names


def _raise_mismatch(name_a: str, a: torch.Size, name_b: str, b: torch.Size) -> None:
    if len(a) and len(b) and a[-1] != b[-1]:
        raise ShapeError(
            f"every member of the cohort must predict the same classes: {name_a} has {a[-1]} classes and "
            f"{name_b} has {b[-1]} (shapes {tuple(a)} and {tuple(b)})"
        )
    raise ShapeError(
        f"{name_a} and {name_b} must have the same shape (B, C), got {tuple(a)} and {tuple(b)} "
        f"(batch size {a[0] if len(a) else '?'} vs {b[0] if len(b) else '?'})"
    )


def _check_student_teachers(student: Tensor, s_name: str, stacked: Tensor, t_name: str, names: list[str]) -> None:
    check_float(s_name, student)
    if student.ndim != 2:
        raise ShapeError(f"{s_name} must be (B, C) logits, got shape {tuple(student.shape)}")
    check_same_device(**{s_name: student, t_name: stacked})
    if stacked.shape[1:] != student.shape:
        _raise_mismatch(f"{t_name}[{names[0]}]", stacked.shape[1:], s_name, student.shape)


# -- DIH cohort --------------------------------------------------------------------------------
def _cohort_rows_eager(
    student_logits: Tensor,
    stacked: Tensor,
    labels: Tensor,
    temperature: float,
    w: list[float] | None,
    kd_coef: float,
    ce_coef: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(total_rows, kd_rows, ce_rows)`` of :func:`cohort_kd` in eager PyTorch (``kd_rows`` detached)."""
    k = stacked.shape[0]
    dtype = compute_dtype(student_logits, stacked)
    s = student_logits.to(dtype)
    # The student's log-softmax is computed once, (B, C), for all K teachers. Since
    #   sum_j w_j KL(p_j || q) = sum_j w_j sum_c p_j log p_j  -  sum_c (sum_j w_j p_j) log q,
    # the only term with a gradient is the student's cross-entropy against the weighted sum of
    # the teachers' distributions: autograd keeps (B, C) tensors, never (K, B, C) ones, and the
    # backward pass costs one softmax whatever K. The floor keeps classes of probability 0
    # (-inf logits) at 0 * finite = 0, as in soft_kl.
    log_q = F.log_softmax(s / temperature, dim=-1).clamp(min=LOG_FLOOR)
    with torch.no_grad():
        log_p = F.log_softmax(stacked.detach().to(dtype) / temperature, dim=-1).clamp(min=LOG_FLOOR)
        p = log_p.exp()
        neg_entropy = (p * log_p).sum(dim=-1)  # (K, B)
        w_t = p.new_tensor(w) if w is not None else p.new_ones(k)
        p_mix = torch.einsum("k,kbc->bc", w_t, p)  # (B, C): sum_j w_j p_j
        # per-teacher values, for the logged parts only (no graph)
        kd_rows = (neg_entropy - torch.einsum("kbc,bc->kb", p, log_q.detach())) * (temperature**2)  # (K, B)
    t2 = temperature**2
    kd_mix = t2 * ((w_t.unsqueeze(1) * neg_entropy).sum(dim=0) - (p_mix * log_q).sum(dim=-1))  # (B,)
    ce_rows = F.cross_entropy(s, labels, reduction="none")  # (B,)

    return kd_coef * kd_mix + ce_coef * ce_rows, kd_rows, ce_rows


def cohort_kd(
    student_logits: Tensor,
    teacher_logits: TeacherLogits,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    alpha: float = 0.5,
    weights: Sequence[float] | Tensor | None = None,
    form: CohortForm = "authors",
    reduction: Reduction = "batchmean",
) -> LossParts:
    r"""Distillation from a cohort of ``K = k + 1`` teachers at once (DIH: k heads + the final classifier).

    With :math:`q = \mathrm{softmax}(z_s / T)`, :math:`p_j = \mathrm{softmax}(z_j / T)` for
    teacher :math:`j`, :math:`\mathrm{KD}_j = T^2\,\mathrm{KL}(p_j \,\|\, q)` (as
    :func:`kdloss.functional.soft_kl`) and :math:`\mathrm{CE}` the cross-entropy of the student
    against the labels, the two forms are, with per-teacher weights :math:`w_j` (all 1 by
    default):

    .. math::

        \mathcal{L}_{\text{authors}} = \sum_{j=1}^{K} w_j \left[\alpha\, \mathrm{KD}_j
        + (1 - \alpha)\, \mathrm{CE}\right]
        \qquad
        \mathcal{L}_{\text{normalized}} = \alpha\, \frac{\sum_j w_j\, \mathrm{KD}_j}{\sum_j w_j}
        + (1 - \alpha)\, \mathrm{CE}

    ``form="authors"`` is what the DIH authors' code computes: the cross-entropy is counted once
    per teacher, ``K`` times in all (so the loss, and the learning rate it calls for, grow with
    ``K``). ``form="normalized"`` counts the cross-entropy once and averages the KD terms, so
    ``K = 1`` gives exactly Hinton's ``alpha * KD + (1 - alpha) * CE`` whatever the weights.
    Because the student's cross-entropy is the same for every teacher, the authors' form is the
    normalised one times :math:`\sum_j w_j`: the two differ by a constant factor (``K`` with
    unit weights), which matters for the learning rate and for combining with other terms.

    The student's log-softmax is computed **once** for all ``K`` teachers (the teacher logits are
    stacked to ``(K, B, C)``), in float32 whatever the input dtype (float64 stays float64); the
    teachers are detached. As :math:`\sum_j w_j \mathrm{KL}(p_j \| q) = \sum_j w_j \sum_c p_{j,c}
    \log p_{j,c} - \sum_c \bar p_c \log q_c` with :math:`\bar p = \sum_j w_j p_j`, the graph
    autograd keeps is that of one ``(B, C)`` cross-entropy against :math:`\bar p`: the backward
    pass does not grow with ``K``.

    Reductions: ``"batchmean"`` (default) averages the KD and CE terms over the batch;
    ``"sum"`` sums them; ``"none"`` keeps one value per sample, ``(B,)``, for the total and for
    every part. ``"mean"`` is refused: it would divide KD by ``B * C`` and CE by ``B``.

    Asadian & Salehi-Abari, *Distilling Knowledge via Intermediate Classifiers* (DIH),
    arXiv:2103.00497, 2021.

    Args:
        student_logits: ``(B, C)`` student logits.
        teacher_logits: the ``K`` teachers' logits: ``(K, B, C)``, a sequence of ``(B, C)``, or a
            mapping name -> ``(B, C)`` whose names label the parts.
        labels: ``(B,)`` integer class indices (any integer dtype: int64, int32, uint8...).
        temperature: softening temperature ``T > 0`` (DIH uses 5).
        alpha: the KD weight in ``[0, 1]`` (DIH uses 0.1).
        weights: optional ``K`` non-negative per-teacher weights, not all zero.
        form: ``"authors"`` or ``"normalized"`` (see above).
        reduction: ``"batchmean" | "sum" | "none"``.

    Returns:
        :class:`kdloss.LossParts`: ``total`` and ``parts`` = ``{"kd/<name>": KD_j, ...,
        "ce": CE, "total": total}`` (unweighted, detached; ``<name>`` is the teacher's index or
        mapping key).

    Shape:
        ``student_logits (B, C)``, ``teacher_logits (K, B, C)``, ``labels (B,)``; ``total`` is a
        scalar, ``(B,)`` for ``"none"``.

    Raises:
        TypeError: for non-floating-point logits or non-integer labels.
        ShapeError: when a teacher predicts a different number of classes than the student or
            another teacher, for different batch sizes, or labels that are not ``(B,)``.
        ValueError: for ``alpha`` outside ``[0, 1]``, a temperature that is not > 0, bad weights,
            an unknown ``form`` or ``reduction``, or tensors on different devices.

    Example:
        >>> import torch
        >>> from kdloss.functional import cohort_kd
        >>> student = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.0]])
        >>> heads = torch.tensor([[[3.0, 0.0, -2.0], [0.0, 2.0, 0.0]],
        ...                       [[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]]])  # K=2 teachers, B=2, C=3
        >>> labels = torch.tensor([0, 1])
        >>> out = cohort_kd(student, heads, labels, temperature=2.0, alpha=0.1)
        >>> round(out.total.item(), 4), sorted(out.parts)
        (0.7575, ['ce', 'kd/0', 'kd/1', 'total'])
        >>> round(cohort_kd(student, heads, labels, temperature=2.0, alpha=0.1, form="normalized").total.item(), 4)
        0.3787
    """
    stacked, names = _stack_logits("teacher_logits", teacher_logits)
    _check_student_teachers(student_logits, "student_logits", stacked, "teacher_logits", names)
    labels = check_class_labels(labels, student_logits).long()  # any integer dtype
    check_positive("temperature", temperature)
    a = check_unit_interval("alpha", alpha)
    if form not in COHORT_FORMS:
        raise ValueError(f"form must be one of {', '.join(map(repr, COHORT_FORMS))}, got {form!r}")
    red = check_reduction(reduction, COHORT_REDUCTIONS)
    k = stacked.shape[0]
    w = check_weights(weights, k, "teacher")

    w_sum = float(sum(w)) if w is not None else float(k)
    if form == "authors":
        kd_coef, ce_coef = a, (1.0 - a) * w_sum
    else:
        kd_coef, ce_coef = a / w_sum, 1.0 - a
    fused: tuple[Tensor, Tensor, Tensor] | None = None
    if _kernels.use_fused(student_logits, stacked, kernel="cohort"):  # CUDA + Triton only
        # One launch reads the student row once for all K teachers and writes the total, the
        # per-teacher KD values and the CE (both detached, for the parts) and the gradient.
        # unit weights: a fill on the device, no host-to-device copy (which would synchronise)
        dev = stacked.device
        if w is None:
            w_kl = torch.full((k,), kd_coef, dtype=torch.float32, device=dev)
        else:
            w_kl = torch.tensor([kd_coef * v for v in w], dtype=torch.float32, device=dev)
        fused = _kernels.run_guarded(  # None: the launch failed, take the eager path
            "cohort",
            student_logits,
            stacked,
            _kernels.fused_cohort_rows,
            student_logits,
            stacked,
            labels,
            temperature=temperature,
            kl_weights=w_kl,
            ce_weight=ce_coef,
        )
    if fused is not None:
        total_rows, kd_rows, ce_rows = fused
    else:
        total_rows, kd_rows, ce_rows = _cohort_rows_eager(
            student_logits, stacked, labels, temperature, w, kd_coef, ce_coef
        )

    batch = student_logits.shape[0]
    total = reduce_loss(total_rows, red, rows=batch)
    parts: dict[str, Tensor] = {}
    kd_values = kd_rows if red == "none" else kd_rows.sum(dim=1)
    if red == "batchmean":
        kd_values = kd_values / max(batch, 1)
    for name, kd_j in zip(names, kd_values.unbind(0)):
        parts[f"kd/{name}"] = kd_j
    parts["ce"] = reduce_loss(ce_rows.detach(), red, rows=batch)
    parts["total"] = total.detach()
    return LossParts(total, parts)


# -- MHKD: paired heads ------------------------------------------------------------------------
def paired_head_kd(
    student_logits: TeacherLogits,
    teacher_logits: TeacherLogits,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    alpha: float = 0.5,
    weights: Sequence[float] | Tensor | None = None,
    reduction: Reduction = "batchmean",
) -> LossParts:
    r"""Head-to-head distillation (MHKD): student head :math:`j` learns from teacher head :math:`j`.

    With :math:`K` pairs of heads (intermediate classifiers mounted at matching stages of the
    student and the teacher, usually plus the two networks' final classifiers):

    .. math::

        \mathcal{L} = \sum_{j=1}^{K} w_j \left[\alpha\, T^2\, \mathrm{KL}(p^t_j \,\|\, q^s_j)
        + (1 - \alpha)\, \mathrm{CE}(z^s_j, y)\right]

    with :math:`p^t_j = \mathrm{softmax}(z^t_j / T)` and :math:`q^s_j = \mathrm{softmax}(z^s_j /
    T)`. All ``K`` pairs are computed in one batched pass over ``(K, B, C)`` stacks; the
    teachers are detached; float32 compute.

    Wang, Lohit, Jones & Fu, *Multi-head Knowledge Distillation for Model Compression* (MHKD),
    arXiv:2012.02911, 2020.

    Args:
        student_logits: ``K`` student heads' logits: ``(K, B, C)``, a sequence or a mapping.
        teacher_logits: the teacher heads' logits at the same stages, same layout.
        labels: ``(B,)`` integer class indices (any integer dtype: int64, int32, uint8...).
        temperature: ``T > 0``.
        alpha: KD weight in ``[0, 1]``.
        weights: optional ``K`` non-negative per-pair weights.
        reduction: ``"batchmean" | "sum" | "none"``.

    Returns:
        :class:`kdloss.LossParts` with parts ``"kd/<j>"`` and ``"ce/<j>"`` per pair and
        ``"total"``.

    Shape:
        ``(K, B, C)`` logits (or ``K`` of ``(B, C)``), ``labels (B,)``.

    Raises:
        ShapeError: if the two sides have a different number of heads, or heads of different
            class counts or batch sizes. TypeError / ValueError: as :func:`cohort_kd`.

    Example:
        >>> import torch
        >>> from kdloss.functional import paired_head_kd
        >>> s, t = torch.zeros(3, 4, 10), torch.randn(3, 4, 10)  # K=3 head pairs, B=4, C=10
        >>> out = paired_head_kd(s, t, torch.tensor([0, 1, 2, 3]), temperature=4.0, alpha=0.9)
        >>> sorted(out.parts)
        ['ce/0', 'ce/1', 'ce/2', 'kd/0', 'kd/1', 'kd/2', 'total']
    """
    s_stack, s_names = _stack_logits("student_logits", student_logits)
    t_stack, _ = _stack_logits("teacher_logits", teacher_logits)
    check_same_device(student_logits=s_stack, teacher_logits=t_stack)
    if s_stack.shape[0] != t_stack.shape[0]:
        raise ShapeError(
            f"student_logits and teacher_logits must hold the same number of heads (paired by stage), "
            f"got {s_stack.shape[0]} and {t_stack.shape[0]}"
        )
    if s_stack.shape != t_stack.shape:
        _raise_mismatch("student head logits", s_stack.shape[1:], "teacher head logits", t_stack.shape[1:])
    labels = check_class_labels(labels, s_stack[0]).long()  # any integer dtype
    check_positive("temperature", temperature)
    a = check_unit_interval("alpha", alpha)
    red = check_reduction(reduction, COHORT_REDUCTIONS)
    k, batch, c = s_stack.shape
    w = check_weights(weights, k, "head pair")

    dtype = compute_dtype(s_stack, t_stack)
    s = in_dtype(s_stack, dtype)
    kd_rows = soft_kl(s, in_dtype(t_stack, dtype), temperature=temperature, reduction="none")  # (K, B), batched
    ce_rows = F.cross_entropy(s.reshape(k * batch, c), labels.repeat(k), reduction="none").view(k, batch)
    pair_rows = torch.add(kd_rows * a, ce_rows, alpha=1.0 - a)  # (K, B)
    if w is not None:
        pair_rows = pair_rows * pair_rows.new_tensor(w).unsqueeze(1)
    total = reduce_loss(pair_rows.sum(dim=0), red, rows=batch)
    # the parts, all pairs at once (detached diagnostics): (K, B) rows, or (K,) reduced, unbound
    with torch.no_grad():
        both = torch.stack((kd_rows, ce_rows))  # (2, K, B)
        if red != "none":
            both = both.sum(dim=2)
            if red == "batchmean":
                both = both / max(batch, 1)
    kd_parts, ce_parts = both.unbind(0)
    parts: dict[str, Tensor] = {}
    for name, kd_j, ce_j in zip(s_names, kd_parts.unbind(0), ce_parts.unbind(0)):
        parts[f"kd/{name}"] = kd_j
        parts[f"ce/{name}"] = ce_j
    parts["total"] = total.detach()
    return LossParts(total, parts)


# -- TOFD ----------------------------------------------------------------------------------------
def orthogonality_penalty(weight: Tensor, *, variant: TOFDVariant = "kdloss") -> Tensor:
    r"""How far an adapter's weight is from orthogonal.

    ``weight`` is reshaped to a matrix :math:`W` of shape ``(out, in * kh * kw)`` (a conv or linear
    weight). Two forms:

    - ``variant="kdloss"`` (default): :math:`\| W W^\top - I \|_F^2`, the Gram matrix taken over
      the smaller side, so that a wide or a tall :math:`W` can reach 0 (orthonormal rows or
      columns);
    - ``variant="authors"`` (the DIH authors' TOFD code): the *unsquared* Frobenius norms of both
      Gram matrices, :math:`\| W W^\top - I \|_F + \| W^\top W - I \|_F`, which only a square
      orthogonal :math:`W` brings to 0. Its gradient is taken as 0 where a norm is exactly 0.

    TOFD adds it, weighted, for its feature adapters so that they keep the features' information
    instead of collapsing it.

    Zhang, Shi, Shi, Ma & Bao, *Task-Oriented Feature Distillation* (TOFD), NeurIPS 2020.

    Args:
        weight: a floating-point tensor with at least 2 dimensions.
        variant: ``"kdloss"`` or ``"authors"`` (see above).

    Returns:
        A scalar, float32 or wider.

    Raises:
        ShapeError: for fewer than 2 dimensions. TypeError: for a non-float tensor. ValueError: an
            unknown ``variant``.

    Example:
        >>> import torch
        >>> orthogonality_penalty(torch.eye(3))
        tensor(0.)
        >>> orthogonality_penalty(2 * torch.eye(2))
        tensor(18.)
        >>> orthogonality_penalty(2 * torch.eye(2), variant="authors")  # 2 * sqrt(2 * 3^2)
        tensor(8.4853)
    """
    check_float("weight", weight)
    if weight.ndim < 2:
        raise ShapeError(f"weight must have at least 2 dimensions (out, in, ...), got shape {tuple(weight.shape)}")
    if variant not in _TOFD_VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(map(repr, _TOFD_VARIANTS))}, got {variant!r}")
    m = in_dtype(weight.reshape(weight.shape[0], -1), compute_dtype(weight))
    if variant == "authors":
        total = m.new_zeros(())
        for gram in (m @ m.t(), m.t() @ m):
            eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
            total = total + _safe_norm((gram - eye).pow(2).sum())
        return total
    if m.shape[0] > m.shape[1]:
        m = m.t()
    gram = m @ m.t()
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return (gram - eye).pow(2).sum()


def _safe_norm(sq: Tensor) -> Tensor:
    """``sqrt(sq)`` for a sum of squares ``sq >= 0``, with gradient 0 (not NaN) where ``sq == 0``."""
    return torch.where(sq > 0, sq.clamp(min=1e-30).sqrt(), 0.0)


def tofd_temperature(epoch: int, *, t: float = 3.0, horizon: float = 250.0) -> float:
    r"""The DIH authors' TOFD temperature schedule: :math:`T_e = 1 + \frac{t}{\text{horizon}}(e + 1)`.

    ``epoch`` counts from 0, so the first epoch trains at :math:`1 + t/250` and epoch 199 (the last
    of their 200) at :math:`1 + 0.8\,t`; it reaches :math:`1 + t` after ``horizon`` epochs. Pass
    it as ``temperature`` to :func:`tofd_authors_loss` every epoch
    (:class:`kdloss.TOFDAuthorsLoss` does so from its ``epoch`` argument).

    Args:
        epoch: the 0-based epoch, an int >= 0.
        t: the schedule's scale (the authors' ``--t``, 3.0), a finite number > 0.
        horizon: the epochs over which the temperature grows by ``t`` (250 in their code), > 0.

    Returns:
        The temperature, a float > 1.

    Raises:
        ValueError: a negative ``epoch``, or ``t``/``horizon`` not a finite number > 0.
        TypeError: a non-integer ``epoch``.

    Example:
        >>> from kdloss.functional import tofd_temperature
        >>> tofd_temperature(0), tofd_temperature(249)
        (1.012, 4.0)
    """
    if isinstance(epoch, bool) or not isinstance(epoch, int):
        raise TypeError(f"epoch must be an int >= 0 (0-based), got {type(epoch).__name__}")
    if epoch < 0:
        raise ValueError(f"epoch must be an int >= 0 (0-based), got {epoch}")
    check_positive("t", t)
    check_positive("horizon", horizon)
    return 1.0 + (t / horizon) * float(epoch + 1)


def tofd_loss(
    student_logits: TeacherLogits,
    teacher_logits: TeacherLogits,
    labels: Tensor,
    student_features: Sequence[Tensor],
    teacher_features: Sequence[Tensor],
    *,
    adapter_weights: Sequence[Tensor] = (),
    temperature: float = 1.0,
    alpha: float = 0.5,
    beta: float = 0.05,
    gamma: float = 0.0,
    weights: Sequence[float] | Tensor | None = None,
) -> LossParts:
    r"""Task-oriented feature distillation (TOFD) over paired task-oriented heads: kdloss's variant.

    .. math::

        \mathcal{L} = \underbrace{\sum_j w_j\left[\alpha\, \mathrm{KD}_j + (1-\alpha)\,
        \mathrm{CE}_j\right]}_{\text{paired\_head\_kd}}
        + \beta \sum_j \mathrm{MSE}\big(r_j(f^s_j), f^t_j\big)
        + \gamma \sum_i \| W_i W_i^\top - I \|_F^2

    This is a variant, not the DIH authors' TOFD (:func:`tofd_authors_loss`), which differs in
    every term. How they map:

    - logits: the authors' soft cross-entropy (weight 1, no :math:`T^2`) plus CE (weight 1) has
      the same gradient as this with ``alpha = 1 / (1 + T^2)`` and every pair weight
      ``(1 + T^2) / T^2``; the values differ by the teachers' entropies;
    - temperature: the authors' grows with the epoch (:func:`tofd_temperature`); pass it as
      ``temperature`` each epoch to reproduce it;
    - features: here the mean squared error, there the unsquared L2 norm of the whole batch's
      difference; no weight converts one into the other;
    - orthogonality: here the squared Frobenius norm over the smaller Gram matrix, there the
      unsquared norms of both (``orthogonality_penalty(w, variant="authors")``);
    - adapters: here the caller's, typically :func:`kdloss.adapter_for` (none at equal widths, a
      biased linear map otherwise), there a bias-free linear adapter on every pair.

    The logits come from the task-oriented (deep) heads of both networks (see
    :class:`kdloss.IntermediateHeads` with ``head="tofd"``), paired by stage; the
    features are those heads' penultimate features, the student's already mapped by its
    adapters :math:`r_j` (as for :func:`kdloss.functional.hint_loss`); ``adapter_weights`` are
    those adapters' weights :math:`W_i` for the orthogonality penalty
    (:func:`orthogonality_penalty`). ``"batchmean"`` reduction for KD and CE, ``"mean"`` for the
    feature MSE (FitNets' convention).

    Zhang, Shi, Shi, Ma & Bao, *Task-Oriented Feature Distillation*, NeurIPS 2020.

    Args:
        student_logits: ``K`` student heads' logits, as :func:`paired_head_kd`.
        teacher_logits: the teacher heads' logits at the same stages.
        labels: ``(B,)`` integer class indices (any integer dtype: int64, int32, uint8...).
        student_features: ``K`` adapted student head features.
        teacher_features: ``K`` teacher head features, same shapes (detached inside).
        adapter_weights: the student adapters' weights for the orthogonality penalty.
        temperature: ``T > 0``.
        alpha: KD weight in ``[0, 1]``.
        beta: weight of the feature term (>= 0).
        gamma: weight of the orthogonality penalty (>= 0).
        weights: optional ``K`` non-negative per-pair weights of the KD + CE terms.

    Returns:
        :class:`kdloss.LossParts` with the parts of :func:`paired_head_kd` plus ``"feat/<j>"``
        per pair and ``"orth"``.

    Raises:
        ValueError: for feature lists of another length than the heads, or a negative
            ``beta``/``gamma``. ShapeError: from :func:`kdloss.functional.hint_loss` when a
            student feature does not match its teacher feature (map it with an adapter).

    Example:
        >>> import torch
        >>> from kdloss.functional import tofd_loss
        >>> s, t, y = torch.zeros(2, 4, 10), torch.randn(2, 4, 10), torch.tensor([0, 1, 2, 3])
        >>> fs, ft = [torch.zeros(4, 8)] * 2, [torch.ones(4, 8)] * 2
        >>> out = tofd_loss(s, t, y, fs, ft, adapter_weights=[torch.eye(8)], beta=0.5, gamma=0.1)
        >>> out.parts["feat/0"], out.parts["orth"]
        (tensor(1.), tensor(0.))
    """
    check_nonnegative("beta", beta)
    check_nonnegative("gamma", gamma)
    head = paired_head_kd(student_logits, teacher_logits, labels, temperature=temperature, alpha=alpha, weights=weights)
    k = len(head.parts) // 2
    sf, tf = list(student_features), list(teacher_features)
    if len(sf) != k or len(tf) != k:
        raise ValueError(
            f"student_features and teacher_features must hold one feature per head pair ({k}), "
            f"got {len(sf)} and {len(tf)}"
        )
    parts = {n: v for n, v in head.parts.items() if n != "total"}
    total = head.total
    for j, (fs, ft) in enumerate(zip(sf, tf)):
        feat = hint_loss(fs, ft)
        parts[f"feat/{j}"] = feat.detach()
        total = total + beta * feat
    if adapter_weights:
        orth = torch.stack([orthogonality_penalty(w) for w in adapter_weights]).sum()
    else:
        orth = total.new_zeros(())
    parts["orth"] = orth.detach()
    total = total + gamma * orth
    parts["total"] = total.detach()
    return LossParts(total, parts)


def tofd_authors_loss(
    student_logits: TeacherLogits,
    teacher_logits: TeacherLogits,
    labels: Tensor,
    student_features: Sequence[Tensor],
    teacher_features: Sequence[Tensor],
    adapter_weights: Sequence[Tensor],
    *,
    temperature: float,
    feature_weight: float = 0.05,
    orth_weight: float = 0.03,
) -> LossParts:
    r"""TOFD as the DIH authors' code computes it (their ``train_tofd.py``), term by term.

    For the :math:`K` pairs of student and teacher outputs (logits :math:`z^s_j, z^t_j`, features
    :math:`f^s_j, f^t_j`) and one bias-free linear adapter :math:`W_j` per pair, always present and
    always penalised:

    .. math::

        \mathcal{L} = \sum_{j=1}^{K} \Big[\mathrm{SCE}_T(z^s_j, z^t_j) + \mathrm{CE}(z^s_j, y)
        + \beta\, \lVert f^s_j W_j^\top - f^t_j \rVert_F \Big]
        + \gamma \sum_{j=1}^{K} \Big(\lVert W_j W_j^\top - I \rVert_F
        + \lVert W_j^\top W_j - I \rVert_F\Big)

    - :math:`\mathrm{SCE}_T(z^s, z^t) = -\frac1B \sum_b \sum_c \mathrm{softmax}(z^t_b/T)_c
      \log\mathrm{softmax}(z^s_b/T)_c`: a soft cross-entropy, weight 1, **no** :math:`T^2`
      (it equals :math:`\mathrm{KL}(p^t \| q^s)` plus the teacher's entropy, so its gradient is
      the KL's); the teacher is detached;
    - :math:`\mathrm{CE}`: the cross-entropy against the labels, weight 1, per pair;
    - :math:`T` is the epoch's temperature, :func:`tofd_temperature` in their code
      (:math:`1 + \frac{t}{250}(e + 1)`); pass it each epoch;
    - the feature term is the plain, unsquared L2 (Frobenius) norm of the whole ``(B, D_t)``
      difference (``torch.dist(..., p=2)``), summed over the batch, not averaged: it grows like
      :math:`\sqrt{B}`; ``feature_weight`` :math:`\beta` is their ``--alpha`` (0.05);
    - the orthogonality term is :func:`orthogonality_penalty` with ``variant="authors"``;
      ``orth_weight`` :math:`\gamma` is their ``--beta`` (0.03).

    The adapters are applied here: ``student_features`` are the raw ``(B, D_s)`` head features,
    ``adapter_weights`` the ``(D_t, D_s)`` weights of ``nn.Linear(D_s, D_t, bias=False)`` modules
    that the caller owns (one per pair, in the student's optimiser), even where ``D_s == D_t``.
    Features of more than 2 dimensions are flattened from dimension 1. Computed in float32 (float64
    stays float64).

    Differences from :func:`tofd_loss` (kdloss's variant) and how to convert: see that function
    and ``docs/fidelity.md``. The authors' heads are stacked separable convolutions
    (``head="tofd"`` of :class:`kdloss.IntermediateHeads` re-instantiates the remaining
    backbone stages instead).

    Zhang, Shi, Shi, Ma & Bao, *Task-Oriented Feature Distillation*, NeurIPS 2020; the DIH authors'
    implementation (Asadian & Salehi-Abari, *Distilling Knowledge via Intermediate Classifiers*).

    Args:
        student_logits: ``K`` student outputs' logits, as :func:`paired_head_kd`.
        teacher_logits: the teacher's, paired with them.
        labels: ``(B,)`` integer class indices.
        student_features: ``K`` raw student features ``(B, D_s)`` (before the adapters).
        teacher_features: ``K`` teacher features ``(B, D_t)``; detached inside.
        adapter_weights: ``K`` adapter weights ``(D_t, D_s)`` (bias-free linear adapters).
        temperature: this epoch's :math:`T > 0` (e.g. ``tofd_temperature(epoch)``).
        feature_weight: :math:`\beta \ge 0` (their ``--alpha``, 0.05).
        orth_weight: :math:`\gamma \ge 0` (their ``--beta``, 0.03).

    Returns:
        :class:`kdloss.LossParts` with parts ``"soft_ce/<j>"``, ``"ce/<j>"``, ``"feat/<j>"``
        (unweighted, detached), ``"orth"`` and ``"total"``.

    Raises:
        TypeError: non-floating logits, features or weights, non-integer labels.
        ShapeError: different numbers of pairs, features or adapters; a feature whose width does
            not match its adapter (``(D_t, D_s)``) or batch size; an adapter that is not 2-D.
        ValueError: a temperature that is not > 0, a negative weight, different devices.

    Example:
        >>> import torch
        >>> from kdloss.functional import tofd_authors_loss, tofd_temperature
        >>> s, t, y = torch.zeros(2, 4, 10), torch.zeros(2, 4, 10), torch.tensor([0, 1, 2, 3])
        >>> fs, ft = [torch.ones(4, 8)] * 2, [torch.ones(4, 8)] * 2
        >>> out = tofd_authors_loss(s, t, y, fs, ft, [torch.eye(8)] * 2, temperature=tofd_temperature(0))
        >>> round(out.parts["soft_ce/0"].item(), 4), out.parts["feat/0"].item(), out.parts["orth"].item()
        (2.3026, 0.0, 0.0)
    """
    s_stack, s_names = _stack_logits("student_logits", student_logits)
    t_stack, _ = _stack_logits("teacher_logits", teacher_logits)
    check_same_device(student_logits=s_stack, teacher_logits=t_stack)
    if s_stack.shape[0] != t_stack.shape[0]:
        raise ShapeError(
            f"student_logits and teacher_logits must hold the same number of outputs (paired), "
            f"got {s_stack.shape[0]} and {t_stack.shape[0]}"
        )
    if s_stack.shape != t_stack.shape:
        _raise_mismatch("student logits", s_stack.shape[1:], "teacher logits", t_stack.shape[1:])
    check_class_labels(labels, s_stack[0])
    check_positive("temperature", temperature)
    check_nonnegative("feature_weight", feature_weight)
    check_nonnegative("orth_weight", orth_weight)
    k, batch, c = s_stack.shape
    sf, tf, ws = list(student_features), list(teacher_features), list(adapter_weights)
    if not len(sf) == len(tf) == len(ws) == k:
        raise ShapeError(
            f"student_features, teacher_features and adapter_weights must hold one entry per pair ({k}), "
            f"got {len(sf)}, {len(tf)} and {len(ws)} (the authors' TOFD always has an adapter per pair)"
        )
    for j, (fs, ft, w) in enumerate(zip(sf, tf, ws)):
        check_float(f"student_features[{j}]", fs)
        check_float(f"teacher_features[{j}]", ft)
        check_float(f"adapter_weights[{j}]", w)
        check_same_device(**{"student_logits": s_stack, f"student_features[{j}]": fs, f"adapter_weights[{j}]": w})
        if w.ndim != 2:
            raise ShapeError(
                f"adapter_weights[{j}] must be the (D_t, D_s) weight of an nn.Linear(D_s, D_t, bias=False), "
                f"got shape {tuple(w.shape)}"
            )
        d_s, d_t = math.prod(fs.shape[1:]), math.prod(ft.shape[1:])
        if fs.ndim < 2 or ft.ndim < 2 or fs.shape[0] != batch or ft.shape[0] != batch or tuple(w.shape) != (d_t, d_s):
            raise ShapeError(
                f"pair {j}: student_features[{j}] {tuple(fs.shape)} and teacher_features[{j}] {tuple(ft.shape)} "
                f"must be (B, D_s) and (B, D_t) with B = {batch}, and adapter_weights[{j}] (D_t, D_s) = "
                f"({d_t}, {d_s}), got {tuple(w.shape)}"
            )

    dtype = compute_dtype(s_stack, t_stack)
    s = s_stack.to(dtype)
    log_q = F.log_softmax(s / temperature, dim=-1)
    p = F.softmax(t_stack.detach().to(dtype) / temperature, dim=-1)
    soft_ce_rows = -(p * log_q).sum(dim=-1)  # (K, B)
    ce_rows = F.cross_entropy(s.reshape(k * batch, c), labels.repeat(k), reduction="none").view(k, batch)
    denominator = max(batch, 1)
    soft_ce = soft_ce_rows.sum(dim=1) / denominator  # (K,)
    ce = ce_rows.sum(dim=1) / denominator
    parts: dict[str, Tensor] = {}
    total = (soft_ce + ce).sum()
    for j, (fs, ft, w) in enumerate(zip(sf, tf, ws)):
        fdt = compute_dtype(fs, ft, w)
        mapped = F.linear(fs.flatten(1).to(fdt), w.to(fdt))
        feat = _safe_norm((mapped - ft.detach().flatten(1).to(fdt)).pow(2).sum())
        parts[f"soft_ce/{s_names[j]}"] = soft_ce[j].detach()
        parts[f"ce/{s_names[j]}"] = ce[j].detach()
        parts[f"feat/{s_names[j]}"] = feat.detach()
        total = total + feature_weight * feat
    orth = torch.stack([orthogonality_penalty(w, variant="authors") for w in ws]).sum()
    parts["orth"] = orth.detach()
    total = total + orth_weight * orth
    parts["total"] = total.detach()
    return LossParts(total, parts)


# -- self-distillation -------------------------------------------------------------------------
def self_distillation_loss(
    exit_logits: TeacherLogits,
    final_logits: Tensor,
    labels: Tensor,
    *,
    exit_features: Sequence[Tensor] | None = None,
    final_feature: Tensor | None = None,
    temperature: float = 3.0,
    alpha: float = 0.3,
    beta: float = 0.03,
) -> LossParts:
    r"""Self-distillation ("Be Your Own Teacher"): the deepest classifier teaches the early exits.

    With early-exit logits :math:`z_1 .. z_k` of one network and its final logits :math:`z_F`:

    .. math::

        \mathcal{L} = \mathrm{CE}(z_F, y) + \sum_{i=1}^{k} \left[(1 - \alpha)\,
        \mathrm{CE}(z_i, y) + \alpha\, T^2\, \mathrm{KL}(p_F \,\|\, q_i)\right]
        + \beta \sum_{i=1}^{k} \mathrm{MSE}(f_i, f_F)

    :math:`p_F = \mathrm{softmax}(z_F / T)` is detached (the deepest classifier teaches, it is
    not pulled towards its students); the feature hint term is added when ``exit_features`` and
    ``final_feature`` are given (the final feature is detached, as a teacher's). The exits share
    one batched log-softmax pass.

    Zhang, Song, Gao, Chen, Bao & Ma, *Be Your Own Teacher: Improve the Performance of
    Convolutional Neural Networks via Self Distillation*, ICCV 2019.

    Args:
        exit_logits: the ``k`` early exits' logits, ``(k, B, C)``, a sequence or a mapping.
        final_logits: ``(B, C)`` logits of the network's own (deepest) classifier.
        labels: ``(B,)`` integer class indices (any integer dtype: int64, int32, uint8...).
        exit_features: optional ``k`` exit features, each shaped like ``final_feature``.
        final_feature: the deepest feature (e.g. the pooled output before ``fc``).
        temperature: ``T > 0``.
        alpha: KD weight in ``[0, 1]``.
        beta: feature-hint weight (>= 0).

    Returns:
        :class:`kdloss.LossParts` with ``"ce/final"``, ``"ce/<i>"``, ``"kd/<i>"``, ``"feat/<i>"``
        (with features) and ``"total"``.

    Raises:
        ValueError: if only one of ``exit_features``/``final_feature`` is given, or their count
            differs from the exits'. ShapeError: for exits whose classes differ from the final
            classifier's, or features of different shapes.

    Example:
        >>> import torch
        >>> from kdloss.functional import self_distillation_loss
        >>> exits, final, y = torch.zeros(3, 4, 10), torch.randn(4, 10), torch.tensor([0, 1, 2, 3])
        >>> out = self_distillation_loss(exits, final, y, exit_features=[torch.zeros(4, 8)] * 3,
        ...                              final_feature=torch.ones(4, 8), beta=0.5)
        >>> out.parts["feat/2"]
        tensor(1.)
    """
    stacked, names = _stack_logits("exit_logits", exit_logits)
    _check_student_teachers(final_logits, "final_logits", stacked, "exit_logits", names)
    if (exit_features is None) != (final_feature is None):
        raise ValueError("exit_features and final_feature must be given together (for the feature hints) or not at all")
    check_nonnegative("beta", beta)
    feats = list(exit_features) if exit_features is not None else []
    if exit_features is not None and len(feats) != len(names):
        raise ValueError(f"exit_features must hold one feature per exit ({len(names)}), got {len(feats)}")
    teacher = final_logits.unsqueeze(0).expand_as(stacked)
    head = paired_head_kd(stacked, teacher, labels, temperature=temperature, alpha=alpha)
    parts: dict[str, Tensor] = {}
    for i, name in enumerate(names):
        parts[f"kd/{name}"] = head.parts[f"kd/{i}"]
        parts[f"ce/{name}"] = head.parts[f"ce/{i}"]
    final = in_dtype(final_logits, compute_dtype(final_logits))
    if final.shape[0] == 0:  # an empty batch gives 0, not cross_entropy's NaN
        ce_final = final.sum() * 0.0
    else:
        ce_final = F.cross_entropy(final, labels.long())
    parts["ce/final"] = ce_final.detach()
    total = head.total + ce_final
    if final_feature is not None:
        for name, f in zip(names, feats):
            feat = hint_loss(f, final_feature)
            parts[f"feat/{name}"] = feat.detach()
            total = total + beta * feat
    parts["total"] = total.detach()
    return LossParts(total, parts)
