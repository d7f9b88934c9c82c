"""Relational and feature-statistics methods: SP, CC, RKD, PKT, FSP and NST.

SP, CC, RKD and PKT compare relations between the samples of a batch; FSP compares Gram
matrices between pairs of layers; NST compares the distributions of neuron activations.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from kdloss._numerics import compute_dtype, detached, in_dtype, pair_up, reduce_loss
from kdloss._validate import (
    Reduction,
    ShapeError,
    check_batch,
    check_float,
    check_nonnegative,
    check_positive,
    check_reduction,
    check_same_device,
)
from kdloss._validate import check_option as _check_option
from kdloss.functional._autograd import cc_neighbours, pkt_self
from kdloss.functional._spatial import unit_rows

__all__ = ["cc_loss", "fsp_loss", "fsp_matrix", "nst_loss", "pkt_loss", "rkd_loss", "sp_loss"]

CCVariant = Literal["paper", "repdistiller"]
RKDPairs = Literal["all", "distinct"]
FSPVariant = Literal["paper", "repdistiller"]


def _pairs(
    student: Tensor | Sequence[Tensor], teacher: Tensor | Sequence[Tensor], method: str
) -> list[tuple[str, Tensor, str, Tensor]]:
    """Pair up one tensor or two equally long sequences, with checked dtype, device and batch size."""
    if (  # one pair, the usual case, in one expression (anything else is checked below, with messages)
        isinstance(student, Tensor)
        and isinstance(teacher, Tensor)
        and student.ndim > 0
        and teacher.ndim > 0
        and student.shape[0] == teacher.shape[0]
        and student.device == teacher.device
        and student.is_floating_point()
        and teacher.is_floating_point()
    ):
        return [("student_features", student, "teacher_features", teacher)]
    s_list, t_list = pair_up(student, teacher, one="tensor", many="tensors", context=f"{method}: ")
    out = []
    single = isinstance(student, Tensor)
    for j, (fs, ft) in enumerate(zip(s_list, t_list)):
        ns = "student_features" if single else f"student_features[{j}]"
        nt = "teacher_features" if single else f"teacher_features[{j}]"
        check_float(ns, fs)
        check_float(nt, ft)
        check_same_device(**{ns: fs, nt: ft})
        check_batch(ns, fs, nt, ft)
        out.append((ns, fs, nt, ft))
    return out


def _add_all(terms: list[Tensor]) -> Tensor:
    """The sum of a non-empty list of loss terms (one per feature pair)."""
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


def _check_rows(name: str, t: Tensor, method: str, min_batch: int = 2) -> None:
    if t.ndim < 2:
        raise ShapeError(f"{name} must be (B, ...) with a feature dimension, got shape {tuple(t.shape)}")
    if t.shape[0] < min_batch:
        raise ShapeError(
            f"{method} relates the samples of a batch and needs B >= {min_batch}, got {name} of shape {tuple(t.shape)}"
        )


# ------------------------------------------------------------------------------------------------ SP


def sp_loss(student_features: Tensor | Sequence[Tensor], teacher_features: Tensor | Sequence[Tensor]) -> Tensor:
    r"""Similarity-preserving KD: match the row-normalised batch Gram matrices of the features.

    For each pair of features, flattened to :math:`Q \in \mathbb{R}^{B \times D}`:

    .. math::

        G = Q Q^\top, \qquad \tilde G_{i,:} = \frac{G_{i,:}}{\lVert G_{i,:} \rVert_2}, \qquad
        \mathcal{L} = \sum_{\text{pairs}} \frac{1}{B^2} \lVert \tilde G_t - \tilde G_s \rVert_F^2 .

    Student and teacher may have any (different) feature shapes; only the batch must agree. The
    loss is invariant to scaling either feature and to any orthogonal transform of the flattened
    features. Computed in float32 (float64 stays float64); the teacher is detached. RepDistiller
    weights this term with 3000 on CIFAR-100.

    Reductions: none. The loss relates the samples of the batch to each other; the result is the
    scalar above (the :math:`1/B^2` mean of the squared differences, summed over pairs).

    Args:
        student_features: one ``(B, *)`` tensor (e.g. ``(B, C, H, W)``) or a sequence of them.
        teacher_features: the teacher's, as many as the student's, each ``(B, *)``.

    Raises:
        TypeError: non-floating features.
        ShapeError: a tensor without a feature dimension, ``B < 2`` or different batch sizes.
        ValueError: sequences of different lengths or empty, different devices.

    Tung & Mori, *Similarity-Preserving Knowledge Distillation*, ICCV 2019.

    Example:
        >>> import torch
        >>> from kdloss.functional import sp_loss
        >>> f = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
        >>> sp_loss(f, 3.0 * f).abs() < 1e-6
        tensor(True)
        >>> sp_loss(f, torch.eye(3))
        tensor(0.1626)
    """
    terms: list[Tensor] = []
    for ns, fs, nt, ft in _pairs(student_features, teacher_features, "sp_loss"):
        _check_rows(ns, fs, "sp_loss")
        _check_rows(nt, ft, "sp_loss")
        dtype = compute_dtype(fs, ft)
        qs = in_dtype(fs, dtype).flatten(1)
        qt = in_dtype(detached(ft), dtype).flatten(1)
        gs = unit_rows(torch.mm(qs, qs.t()))
        gt = unit_rows(torch.mm(qt, qt.t()))
        terms.append(F.mse_loss(gs, gt))  # the mean of the squared differences: one kernel each way
    return _add_all(terms)


# ------------------------------------------------------------------------------------------------ CC


def _check_embeddings(ns: str, fs: Tensor, nt: str, ft: Tensor, method: str) -> None:
    for name, f in ((ns, fs), (nt, ft)):
        if f.ndim != 2:
            raise ShapeError(f"{name} must be (B, D) embeddings, got shape {tuple(f.shape)}")
    _check_rows(ns, fs, method)


def cc_loss(
    student_embeddings: Tensor,
    teacher_embeddings: Tensor,
    *,
    gamma: float = 0.4,
    order: int = 2,
    variant: CCVariant = "paper",
) -> Tensor:
    r"""Correlation congruence: match the batch correlation matrices of the embeddings.

    ``variant="paper"`` (default): embeddings are L2-normalised and correlated with the
    :math:`P`-th order Taylor expansion of the Gaussian RBF kernel
    :math:`k(x, y) = e^{-\gamma \lVert x - y \rVert^2} = e^{-2\gamma} e^{2\gamma x^\top y}`
    (for unit vectors):

    .. math::

        \psi(F)_{ij} = \sum_{p=0}^{P} e^{-2\gamma} \frac{(2\gamma)^p}{p!} (f_i^\top f_j)^p, \qquad
        \mathcal{L} = \frac{1}{B^2} \lVert \psi(F_t) - \psi(F_s) \rVert_F^2 .

    Student and teacher may have different embedding sizes.

    ``variant="repdistiller"``: the widely used RepDistiller implementation, which is not the
    paper's formula: with :math:`\delta = |f_s - f_t|` (same sizes required, no normalisation
    inside), :math:`\mathcal{L} = \frac{1}{B-1} \sum_{i=1}^{B-1} \delta_i^\top \delta_{i+1}`;
    ``gamma`` and ``order`` are unused there. It is offered to reproduce that code's numbers.

    Both run in float32 (float64 stays float64), teacher detached. The paper puts a linear
    embedding on each network's penultimate features before this loss (an adapter, on the
    student side; see :class:`kdloss.LinearAdapter`).

    Reductions: none; the loss couples the batch and returns the scalar above.

    Args:
        student_embeddings: ``(B, D_s)`` embeddings, ``B >= 2``.
        teacher_embeddings: ``(B, D_t)`` embeddings; detached inside.
        gamma: the RBF kernel's :math:`\gamma > 0`.
        order: the Taylor order :math:`P \ge 0` (default 2).
        variant: ``"paper"`` or ``"repdistiller"``.

    Raises:
        TypeError: non-floating embeddings, a non-integer ``order``.
        ShapeError: embeddings not 2-D, ``B < 2``, different batch sizes (or different ``D`` for
            ``"repdistiller"``).
        ValueError: ``gamma <= 0``, ``order < 0``, an unknown ``variant``, different devices.

    Peng, Jin, Liu, Li, Wu, Liu, Zhou & Zhang, *Correlation Congruence for Knowledge
    Distillation*, ICCV 2019.

    Example:
        >>> import torch
        >>> from kdloss.functional import cc_loss
        >>> f = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
        >>> cc_loss(f, 2.0 * f)
        tensor(0.)
        >>> cc_loss(f, torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]]))
        tensor(0.0473)
    """
    ((ns, fs, nt, ft),) = _pairs(student_embeddings, teacher_embeddings, "cc_loss")
    ns, nt = "student_embeddings", "teacher_embeddings"
    _check_embeddings(ns, fs, nt, ft, "cc_loss")
    check_positive("gamma", gamma)
    if isinstance(order, bool) or not isinstance(order, int):
        raise TypeError(f"order must be an int, got {type(order).__name__} {order!r}")
    if order < 0:
        raise ValueError(f"order must be >= 0, got {order}")
    _check_option("variant", variant, ("paper", "repdistiller"))
    dtype = compute_dtype(fs, ft)
    s = in_dtype(fs, dtype)
    t = in_dtype(detached(ft), dtype)
    if variant == "repdistiller":
        if s.shape != t.shape:
            raise ShapeError(
                "cc_loss(variant='repdistiller') subtracts the embeddings and needs equal shapes, "
                f"got {tuple(s.shape)} and {tuple(t.shape)}"
            )
        # mean over i of <|d_i|, |d_{i+1}|>: one autograd.Function
        return cc_neighbours(s, t)
    if order == 0:  # psi is the constant exp(-2 gamma) for both: the loss is 0
        return (s.sum() * 0.0).to(dtype)
    coefs = [math.exp(-2.0 * gamma) * (2.0 * gamma) ** p / math.factorial(p) for p in range(order + 1)]

    def psi(f: Tensor) -> Tensor:
        # Horner's scheme for sum_p c_p x^p, without c_0 (it cancels in psi(t) - psi(s))
        sim = (g := unit_rows(f)) @ g.t()
        out = sim * coefs[order]
        for c in reversed(coefs[1:order]):
            out = (out + c) * sim
        return out

    return F.mse_loss(psi(s), psi(t))


# ------------------------------------------------------------------------------------------------ RKD


def _relations(e: Tensor, off_diagonal: Tensor, angles: bool) -> tuple[Tensor, Tensor | None]:
    """Pairwise distances ``(B, B)`` (exact zero diagonal, finite gradients there) and, with ``angles``,
    ``A[i, j, k] = <unit(e_j - e_i), unit(e_k - e_i)>`` ``(B, B, B)`` (0 where a difference is 0), both
    from the Gram matrix of the centred embeddings: no ``(B, B, D)`` differences.

    ``<e_j - e_i, e_k - e_i> = G_jk - G_ij - G_ik + G_ii`` and ``||e_i - e_j||^2 = G_ii + G_jj - 2 G_ij``.
    Both are invariant to translating the embeddings; centring them first keeps the Gram entries
    of the order of the distances, so the differences lose no more precision than the
    differences of the embeddings themselves would.
    """
    c = e - e.mean(0)
    gram = c @ c.t()
    sq = gram.diagonal()
    dist_sq = (sq.unsqueeze(1) + sq.unsqueeze(0)).sub_(gram, alpha=2.0)
    root = dist_sq.clamp(min=1e-12).sqrt()
    dist = root * off_diagonal
    if not angles:
        return dist, None
    # 1 / d off the diagonal, 0 on it (where the difference, and so the angle, is 0)
    inv = off_diagonal / root
    num = gram.unsqueeze(0) - gram.unsqueeze(2) - gram.unsqueeze(1) + sq.view(-1, 1, 1)
    return dist, num * inv.unsqueeze(2) * inv.unsqueeze(1)


def rkd_loss(
    student_embeddings: Tensor,
    teacher_embeddings: Tensor,
    *,
    distance_weight: float = 25.0,
    angle_weight: float = 50.0,
    pairs: RKDPairs = "all",
) -> Tensor:
    r"""Relational KD: distance-wise and angle-wise potentials compared with the Huber loss.

    With :math:`\mu = \frac{1}{|\{i \ne j\}|} \sum_{i \ne j} \lVert e_i - e_j \rVert` the mean
    distance between distinct samples of the batch,

    .. math::

        \psi_D(e_i, e_j) = \frac{\lVert e_i - e_j \rVert}{\mu}, \qquad
        \psi_A(e_i, e_j, e_k) = \Big\langle \frac{e_j - e_i}{\lVert e_j - e_i \rVert},
        \frac{e_k - e_i}{\lVert e_k - e_i \rVert} \Big\rangle,

    .. math::

        \mathcal{L} = \lambda_D \, \mathrm{avg}_{(i,j)}\, \ell_\delta\big(\psi_D^s - \psi_D^t\big)
        + \lambda_A \, \mathrm{avg}_{(i,j,k)}\, \ell_\delta\big(\psi_A^s - \psi_A^t\big),

    with :math:`\ell_\delta` the Huber loss, :math:`\delta = 1` (``smooth_l1_loss``). The paper
    writes sums over pairs and triplets; the weights 25 and 50 it reports go with averages.
    ``pairs`` chooses what is averaged over:

    - ``"all"`` (default): all :math:`B^2` pairs and :math:`B^3` triplets, degenerate ones
      (repeated indices, whose potentials are 0 or 1 for both networks and so contribute 0)
      included, as in the authors' and RepDistiller's code;
    - ``"distinct"``: only pairs :math:`i \ne j` and triplets of three different indices.

    The loss is invariant to rotating, translating and scaling either embedding. Distances and
    angles are computed in float32 (float64 stays float64) with finite gradients at coincident
    points; the teacher is detached. Embedding sizes may differ.

    Reductions: none; the loss couples the batch and returns the scalar above.

    Args:
        student_embeddings: ``(B, D_s)`` embeddings (e.g. penultimate features), ``B >= 2``
            (``B >= 3`` for the angle term with ``pairs="distinct"``).
        teacher_embeddings: ``(B, D_t)`` embeddings; detached inside.
        distance_weight: :math:`\lambda_D \ge 0` (25); 0 skips the distance term.
        angle_weight: :math:`\lambda_A \ge 0` (50); 0 skips the angle term.
        pairs: ``"all"`` or ``"distinct"``.

    Raises:
        TypeError: non-floating embeddings.
        ShapeError: embeddings not 2-D, ``B`` too small, different batch sizes.
        ValueError: negative weights, an unknown ``pairs``, different devices.

    Park, Kim, Lu & Cho, *Relational Knowledge Distillation*, CVPR 2019.

    Example:
        >>> import torch
        >>> from kdloss.functional import rkd_loss
        >>> e = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
        >>> rot = torch.tensor([[0.0, -1.0], [1.0, 0.0]])
        >>> rkd_loss(e, 5.0 * e @ rot + 1.0).abs() < 1e-6
        tensor(True)
        >>> rkd_loss(e, torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]]))
        tensor(6.5997)
    """
    ((_, fs, _, ft),) = _pairs(student_embeddings, teacher_embeddings, "rkd_loss")
    ns, nt = "student_embeddings", "teacher_embeddings"
    _check_embeddings(ns, fs, nt, ft, "rkd_loss")
    check_nonnegative("distance_weight", distance_weight)
    check_nonnegative("angle_weight", angle_weight)
    _check_option("pairs", pairs, ("all", "distinct"))
    batch = fs.shape[0]
    if pairs == "distinct" and angle_weight > 0 and batch < 3:
        raise ShapeError(
            f"rkd_loss(pairs='distinct') needs B >= 3 for the angle term, got student_embeddings of shape "
            f"{tuple(fs.shape)}"
        )
    dtype = compute_dtype(fs, ft)
    s = in_dtype(fs, dtype)
    t = in_dtype(detached(ft), dtype)
    n_pairs = batch * (batch - 1)
    off_diagonal = ~torch.eye(batch, dtype=torch.bool, device=s.device)
    angles = angle_weight > 0
    ds, a_s = _relations(s, off_diagonal, angles)
    with torch.no_grad():
        dt, a_t = _relations(t, off_diagonal, angles)
    loss: Tensor | None = None
    if distance_weight > 0:
        ds = ds / (ds.sum() / n_pairs).clamp(min=1e-12)
        dt = dt / (dt.sum() / n_pairs).clamp(min=1e-12)
        huber = F.smooth_l1_loss(ds, dt, reduction="sum")
        loss = huber * (distance_weight / (batch * batch if pairs == "all" else n_pairs))
    if a_s is not None and a_t is not None:
        if pairs == "all":
            term = F.smooth_l1_loss(a_s, a_t) * angle_weight
        else:
            idx = torch.arange(batch, device=s.device)
            i, j, k = idx.view(-1, 1, 1), idx.view(1, -1, 1), idx.view(1, 1, -1)
            distinct = (i != j) & (i != k) & (j != k)
            n_trip = batch * (batch - 1) * (batch - 2)
            huber3 = F.smooth_l1_loss(a_s, a_t, reduction="none")
            term = torch.where(distinct, huber3, 0.0).sum() * (angle_weight / n_trip)
        loss = term if loss is None else loss + term
    return loss if loss is not None else s.new_zeros(())


# ------------------------------------------------------------------------------------------------ PKT


def pkt_loss(
    student_embeddings: Tensor,
    teacher_embeddings: Tensor,
    *,
    include_self: bool = True,
    reduction: Reduction = "mean",
    eps: float = 1e-7,
) -> Tensor:
    r"""Probabilistic knowledge transfer: KL between cosine-similarity conditional distributions.

    With the cosine kernel :math:`K(a, b) = \frac{1}{2}\big(\frac{a^\top b}{\lVert a\rVert
    \lVert b\rVert} + 1\big) \in [0, 1]`, each sample :math:`i` defines a distribution over the
    batch, :math:`p_{j|i} = K(e_i, e_j) / \sum_k K(e_i, e_k)`, for the teacher (:math:`p^t`) and
    the student (:math:`p^s`), and

    .. math::

        \ell_i = \sum_j p^t_{j|i} \log \frac{p^t_{j|i}}{p^s_{j|i}} .

    ``include_self=True`` (default, the authors' and RepDistiller's code) keeps :math:`j = i` and
    :math:`k = i` (where :math:`K = 1`); ``include_self=False`` is the paper's equation, which
    leaves them out (needs ``B >= 3``). Probabilities are clamped below at ``eps`` before the
    log, so a kernel value of 0 (opposite embeddings) gives a finite loss. Computed in float32
    (float64 stays float64), teacher detached. Embedding sizes may differ.

    Against RepDistiller's ``PKT`` (which divides the embeddings by ``norm + eps`` and computes
    ``mean(q * log((q + eps) / (p + eps)))``, :math:`q` the teacher's and :math:`p` the student's
    conditionals), with ``include_self=True`` and ``reduction="mean"``:

    - with ``eps = 0`` on both sides the two are the same formula, equal to rounding, for
      non-zero embeddings whose teacher kernel values are all > 0 (where one is 0, RepDistiller
      computes ``0 * log 0 = NaN``, kdloss 0);
    - with ``eps > 0`` (both default to ``1e-7``) kdloss's value minus RepDistiller's is, to first
      order, :math:`\epsilon \cdot \mathrm{mean}_{ij}(q_{ij}/p_{ij} - 1)`, plus a term of order
      :math:`\epsilon / \lVert e \rVert` from RepDistiller's ``eps`` in the norms. This is not
      bounded by ``eps``: it grows with the teacher/student probability ratio (about
      :math:`3 \cdot 10^{-7}` for 4 samples of 3-d embeddings, and :math:`10^{-6}` when
      :math:`q/p` reaches 90). Gradients differ likewise.

    Reductions (``B`` rows of ``B`` entries): ``"none"`` gives :math:`\ell_i`, ``(B,)``;
    ``"sum"`` the paper's :math:`\sum_i \ell_i`; ``"batchmean"`` :math:`\frac{1}{B}\sum_i \ell_i`;
    ``"mean"`` (default, RepDistiller's value) :math:`\frac{1}{B^2}\sum_i \ell_i`, the mean over
    the :math:`B \times B` entries.

    Args:
        student_embeddings: ``(B, D_s)`` embeddings, ``B >= 2``.
        teacher_embeddings: ``(B, D_t)`` embeddings; detached inside.
        include_self: keep the :math:`j = i` terms (see above).
        reduction: ``"none" | "mean" | "batchmean" | "sum"``.
        eps: lower bound of the probabilities inside the log, ``>= 0``.

    Raises:
        TypeError: non-floating embeddings.
        ShapeError: embeddings not 2-D, ``B`` too small, different batch sizes.
        ValueError: an unknown ``reduction``, negative ``eps``, different devices.

    Passalis & Tefas, *Learning Deep Representations with Probabilistic Knowledge Transfer*,
    ECCV 2018.

    Example:
        >>> import torch
        >>> from kdloss.functional import pkt_loss
        >>> e = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
        >>> pkt_loss(e, 3.0 * e)
        tensor(0.)
        >>> pkt_loss(e, torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]]), reduction="sum")
        tensor(0.1353)
    """
    ((_, fs, _, ft),) = _pairs(student_embeddings, teacher_embeddings, "pkt_loss")
    ns, nt = "student_embeddings", "teacher_embeddings"
    _check_embeddings(ns, fs, nt, ft, "pkt_loss")
    check_reduction(reduction)
    check_nonnegative("eps", eps)
    batch = fs.shape[0]
    if not include_self and batch < 3:
        raise ShapeError(
            f"pkt_loss(include_self=False) needs B >= 3, got student_embeddings of shape {tuple(fs.shape)}"
        )
    dtype = compute_dtype(fs, ft)
    es, et = in_dtype(fs, dtype), in_dtype(detached(ft), dtype)
    if include_self and eps > 0 and not torch.compiler.is_compiling():
        # one autograd.Function (analytic backward); compiled graphs fuse the plain form below
        divisor = {"none": 0, "sum": 1, "batchmean": max(batch, 1)}.get(reduction, max(batch * batch, 1))
        return pkt_self(es, et, eps=eps, divisor=divisor)
    if include_self and eps > 0:
        # Every kernel row holds K(e_i, e_i) = 1, so no row sum is 0; with eps > 0 a probability of 0
        # gives 0 * log(eps) = 0 and (the clamp) no gradient: no masks needed. The kernel's 1/2
        # cancels in the row normalisation.
        ps = _cosine_conditional(es)
        with torch.no_grad():
            pt = _cosine_conditional(et)
            log_pt = pt.clamp(min=eps).log_()
        terms = (log_pt - ps.clamp(min=eps).log()).mul_(pt)
        if reduction == "none":
            return terms.sum(dim=1)
        total = terms.sum()
        return total if reduction == "sum" else total / (batch if reduction == "batchmean" else batch * batch)
    eye = torch.eye(batch, dtype=torch.bool, device=fs.device)

    def conditional(e: Tensor) -> Tensor:
        e = F.normalize(e, dim=1)
        k = 0.5 * (e @ e.t() + 1.0)
        if not include_self:
            k = torch.where(eye, 0.0, k)
        return k / k.sum(dim=1, keepdim=True).clamp(min=1e-30)

    ps = conditional(es)
    pt = conditional(et)
    # Terms with p_t = 0 (the diagonal without include_self) are 0. Their p_s is replaced by 1
    # before the log as well: a log(0) left in the unselected branch of the where would send
    # 0 * inf = NaN into the gradient (seen with eps=0 on torch 2.11). A NaN p_t (a NaN teacher
    # embedding) is "present" (NaN != 0): the loss is NaN, the problem is not hidden as a 0.
    present = pt != 0
    log_ratio = torch.where(present, pt, 1.0).clamp(min=eps).log() - torch.where(present, ps, 1.0).clamp(min=eps).log()
    terms = torch.where(present, pt * log_ratio, 0.0)
    per_row = terms.sum(dim=1)
    return reduce_loss(per_row, reduction, rows=batch, elements_per_row=batch)


def _cosine_conditional(e: Tensor) -> Tensor:
    """``p_{j|i}`` of the cosine kernel ``(cos + 1) / 2`` (self included), rows normalised."""
    n = unit_rows(e)
    k = (n @ n.t()).add_(1.0)
    return k / k.sum(dim=1, keepdim=True)


# ------------------------------------------------------------------------------------------------ FSP


def fsp_matrix(first: Tensor, second: Tensor) -> Tensor:
    r"""The FSP ("flow of solution procedure") matrix between two feature maps of one network.

    .. math::

        G_{ij} = \frac{1}{HW} \sum_{h, w} F^{(1)}_{i, h, w} F^{(2)}_{j, h, w}

    If the spatial sizes differ, the larger map is average-pooled (``adaptive_avg_pool2d``) to
    the smaller size first (as in RepDistiller; the paper pairs layers of equal size).

    Args:
        first: ``(B, C_1, H, W)``.
        second: ``(B, C_2, H', W')``.

    Returns:
        ``(B, C_1, C_2)`` in float32 (float64 for float64 input).

    Raises:
        TypeError: non-floating maps.
        ShapeError: maps not 4-D, or of different batch sizes.
        ValueError: maps on different devices.

    Example:
        >>> import torch
        >>> fsp_matrix(torch.ones(1, 2, 4, 4), 2.0 * torch.ones(1, 3, 2, 2))
        tensor([[[2., 2., 2.],
                 [2., 2., 2.]]])
    """
    for name, f in (("first", first), ("second", second)):
        check_float(name, f)
        if f.ndim != 4:
            raise ShapeError(f"{name} must be a (B, C, H, W) feature map, got shape {tuple(f.shape)}")
    check_batch("first", first, "second", second)
    check_same_device(first=first, second=second)
    dtype = compute_dtype(first, second)
    a, b = first.to(dtype), second.to(dtype)
    if a.shape[-2:] != b.shape[-2:]:
        size = (min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1]))
        a = F.adaptive_avg_pool2d(a, size)
        b = F.adaptive_avg_pool2d(b, size)
    hw = a.shape[-2] * a.shape[-1]
    return a.flatten(2) @ b.flatten(2).transpose(1, 2) / hw


def fsp_loss(
    student_features: Sequence[Tensor],
    teacher_features: Sequence[Tensor],
    *,
    variant: FSPVariant = "paper",
    reduction: Reduction = "mean",
) -> Tensor:
    r"""FSP: match the Gram ("flow") matrices between consecutive stages of student and teacher.

    With :math:`G_l` = :func:`fsp_matrix` of stages :math:`l` and :math:`l + 1` (``L`` stages give
    ``L - 1`` matrices), the per-sample loss is

    .. math::

        \ell = \sum_{l=1}^{L-1} \lVert G_l^t - G_l^s \rVert_2^2 \quad (\texttt{variant="paper"}),
        \qquad
        \ell = \sum_{l=1}^{L-1} \frac{1}{C_l C_{l+1}} \lVert G_l^t - G_l^s \rVert_2^2
        \quad (\texttt{variant="repdistiller"}),

    the paper's squared L2 norm of the matrix difference (equal layer weights), or the mean over
    the matrix entries as in RepDistiller. Stage ``l``'s channel count must be the same for
    student and teacher (else add an adapter on the student side); spatial sizes may differ
    within a network (see :func:`fsp_matrix`). Teacher detached; float32 compute.

    Reductions: ``"none"`` gives :math:`\ell`, ``(B,)``; ``"mean"`` (default) and ``"batchmean"``
    its mean over the batch (the paper's :math:`1/N`); ``"sum"`` its sum.

    Args:
        student_features: a sequence of ``L >= 2`` stage maps ``(B, C_l, H_l, W_l)``.
        teacher_features: the teacher's ``L`` stage maps with the same ``C_l``.
        variant: ``"paper"`` or ``"repdistiller"``.
        reduction: ``"none" | "mean" | "batchmean" | "sum"``.

    Raises:
        TypeError: non-floating maps, a single tensor instead of a sequence.
        ShapeError: maps not 4-D, different batch sizes, student/teacher channel counts that differ.
        ValueError: fewer than 2 stages, different lengths, an unknown ``variant``/``reduction``.

    Yim, Joo, Bae & Kim, *A Gift from Knowledge Distillation: Fast Optimization, Network
    Minimization and Transfer Learning*, CVPR 2017.

    Example:
        >>> import torch
        >>> from kdloss.functional import fsp_loss
        >>> s = [torch.ones(2, 2, 4, 4), torch.ones(2, 3, 2, 2)]
        >>> t = [torch.ones(2, 2, 8, 8), 2.0 * torch.ones(2, 3, 4, 4)]
        >>> fsp_loss(s, t)
        tensor(6.)
        >>> fsp_loss(s, t, variant="repdistiller")
        tensor(1.)
    """
    if isinstance(student_features, Tensor) or isinstance(teacher_features, Tensor):
        raise TypeError("fsp_loss needs sequences of L >= 2 stage feature maps, got a single tensor")
    pairs = _pairs(student_features, teacher_features, "fsp_loss")
    if len(pairs) < 2:
        raise ValueError(f"fsp_loss needs at least 2 stages to form a flow matrix, got {len(pairs)}")
    _check_option("variant", variant, ("paper", "repdistiller"))
    check_reduction(reduction)
    for ns, fs, nt, ft in pairs:
        for name, f in ((ns, fs), (nt, ft)):
            if f.ndim != 4:
                raise ShapeError(f"{name} must be a (B, C, H, W) feature map, got shape {tuple(f.shape)}")
        if fs.shape[1] != ft.shape[1]:
            raise ShapeError(
                f"{ns} and {nt} must have the same channel count for their FSP matrices to compare, "
                f"got {fs.shape[1]} and {ft.shape[1]} (add a student-side adapter)"
            )
    ns0, fs0 = pairs[0][0], pairs[0][1]
    for ns, fs, _, _ in pairs[1:]:
        check_batch(ns0, fs0, ns, fs)
        check_same_device(**{ns0: fs0, ns: fs})
    batch = pairs[0][1].shape[0]
    total: Tensor | None = None
    for (_, s1, _, t1), (_, s2, _, t2) in itertools.pairwise(pairs):
        gs, hw_s = _flow(s1, s2)
        with torch.no_grad():
            gt, hw_t = _flow(detached(t1), detached(t2))
        # (G_t - G_s)^2 with G = raw / hw: the 1/hw is applied once to the squared sum where the two
        # networks' stages share a size (the usual case), else to each matrix
        if hw_s != hw_t:
            gs, gt, hw = gs / hw_s, gt / hw_t, 1
        else:
            hw = hw_s
        per_entry = 1.0 / (gs.shape[1] * gs.shape[2]) if variant == "repdistiller" else 1.0
        if reduction == "none":
            term = F.mse_loss(gs, gt, reduction="none").flatten(1).sum(1) * (per_entry / hw**2)
            total = term if total is None else total + term
            continue
        sq = F.mse_loss(gs, gt, reduction="sum")
        scale = per_entry / hw**2 / (max(batch, 1) if reduction != "sum" else 1)
        total = sq * scale if total is None else torch.add(total, sq, alpha=scale)
    if total is None:
        raise ValueError("fsp_loss needs at least 2 stages")
    return total


def _flow(first: Tensor, second: Tensor) -> tuple[Tensor, int]:
    """The FSP matrix times ``h w`` (validated maps; the larger one pooled to the smaller size) and ``h w``."""
    dtype = compute_dtype(first, second)
    a, b = in_dtype(first, dtype), in_dtype(second, dtype)
    if a.shape[-2:] != b.shape[-2:]:
        size = (min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1]))
        a = F.adaptive_avg_pool2d(a, size) if a.shape[-2:] != size else a
        b = F.adaptive_avg_pool2d(b, size) if b.shape[-2:] != size else b
    return torch.bmm(a.flatten(2), b.flatten(2).transpose(1, 2)), a.shape[-2] * a.shape[-1]


# ------------------------------------------------------------------------------------------------ NST


def nst_loss(
    student_features: Tensor | Sequence[Tensor],
    teacher_features: Tensor | Sequence[Tensor],
    *,
    degree: int = 2,
    bias: float = 0.0,
    reduction: Reduction = "mean",
) -> Tensor:
    r"""Neuron selectivity transfer: squared MMD between the normalised channel activations.

    Each channel :math:`k` of a map is a sample :math:`f^k = F_{k,:} / \lVert F_{k,:} \rVert_2
    \in \mathbb{R}^{HW}` of that network's "neuron selectivity" distribution. With the
    polynomial kernel :math:`\kappa(x, y) = (x^\top y + c)^d` and :math:`C_s, C_t` channels, the
    per-sample loss is the squared MMD

    .. math::

        \ell = \frac{1}{C_t^2} \sum_{i, i'} \kappa(f_t^i, f_t^{i'})
        + \frac{1}{C_s^2} \sum_{j, j'} \kappa(f_s^j, f_s^{j'})
        - \frac{2}{C_s C_t} \sum_{i, j} \kappa(f_s^j, f_t^i),

    summed over feature pairs. Channel counts may differ; the spatial sizes must agree, except
    that a larger map is average-pooled to the smaller size (as in RepDistiller). The paper's
    choice is :math:`d = 2, c = 0` (RepDistiller weights the term with 50); the
    teacher-only first term is a constant for the student, kept so that the value is the MMD
    (:math:`\ge 0`, 0 for equal maps). Teacher detached; float32 compute.

    Reductions: ``"none"`` gives :math:`\ell`, ``(B,)``; ``"mean"`` (default) and ``"batchmean"``
    its mean over the batch; ``"sum"`` its sum.

    Args:
        student_features: one ``(B, C_s, H, W)`` map or a sequence of them.
        teacher_features: the teacher's, as many, ``(B, C_t, H, W)``.
        degree: the kernel's degree :math:`d \ge 1`.
        bias: the kernel's :math:`c \ge 0`.
        reduction: ``"none" | "mean" | "batchmean" | "sum"``.

    Raises:
        TypeError: non-floating maps, a non-integer ``degree``.
        ShapeError: maps not 4-D, different batch sizes.
        ValueError: ``degree < 1``, ``bias < 0``, sequences of different lengths, an unknown
            ``reduction``, different devices.

    Huang & Wang, *Like What You Like: Knowledge Distill via Neuron Selectivity Transfer*, 2017.

    Example:
        >>> import torch
        >>> from kdloss.functional import nst_loss
        >>> f = torch.arange(8.0).view(1, 2, 2, 2)
        >>> nst_loss(f, torch.cat([f, f], dim=1)).abs() < 1e-6
        tensor(True)
        >>> nst_loss(f, torch.eye(2).view(1, 1, 2, 2))
        tensor(1.1077)
    """
    if isinstance(degree, bool) or not isinstance(degree, int):
        raise TypeError(f"degree must be an int, got {type(degree).__name__} {degree!r}")
    if degree < 1:
        raise ValueError(f"degree must be >= 1, got {degree}")
    check_nonnegative("bias", bias)
    check_reduction(reduction)
    terms: list[Tensor] = []
    for ns, fs, nt, ft in _pairs(student_features, teacher_features, "nst_loss"):
        for name, f in ((ns, fs), (nt, ft)):
            if f.ndim != 4:
                raise ShapeError(f"{name} must be a (B, C, H, W) feature map, got shape {tuple(f.shape)}")
        dtype = compute_dtype(fs, ft)
        s, t = in_dtype(fs, dtype), in_dtype(detached(ft), dtype)
        if s.shape[-2:] != t.shape[-2:]:
            size = (min(s.shape[-2], t.shape[-2]), min(s.shape[-1], t.shape[-1]))
            s = F.adaptive_avg_pool2d(s, size) if s.shape[-2:] != size else s
            t = F.adaptive_avg_pool2d(t, size) if t.shape[-2:] != size else t
        a = unit_rows(s.flatten(2), dim=2)  # (B, C_s, HW)
        with torch.no_grad():
            b = unit_rows(t.flatten(2), dim=2)  # (B, C_t, HW)
        cs, ct, hw = a.shape[1], b.shape[1], a.shape[2]
        if degree == 2 and bias == 0.0 and hw * (cs + ct) < cs * cs + ct * ct + cs * ct:
            # sum_ij <a_i, b_j>^2 = <A^T A, B^T B>_F, so the degree-2 MMD is || A^T A / C_s - B^T B / C_t ||_F^2:
            # two (HW x HW) products instead of three (C x C) ones, when those are smaller
            ga = torch.bmm(a.transpose(1, 2), a)
            with torch.no_grad():
                gb = torch.bmm(b.transpose(1, 2), b)
                if cs != ct:
                    gb = gb.mul_(cs / ct)
            terms.append(F.mse_loss(ga, gb, reduction="none").flatten(1).sum(1) * (1.0 / (cs * cs)))
            continue

        def kernel_mean(x: Tensor, y: Tensor) -> Tensor:
            k = torch.bmm(x, y.transpose(1, 2))
            return (k + bias if bias else k).pow(degree).mean(dim=(1, 2))

        with torch.no_grad():
            tt = kernel_mean(b, b)
        terms.append(kernel_mean(a, a).sub(kernel_mean(a, b), alpha=2.0).add_(tt))
    per_sample = _add_all(terms)
    return reduce_loss(per_sample, reduction, rows=per_sample.shape[0])
