"""Feature methods whose trainable parts live on the student side: VID, AB, FT and ReviewKD's HCL.

Only the loss arithmetic is here. The trainable parts (VID's regressor and variance, AB's
connector, FT's paraphraser and translator, ReviewKD's fusion) are explicit modules in
:mod:`kdloss.parts.feature`, owned by the student side so that the optimiser, DDP and
checkpoints see them.
"""

from __future__ import annotations

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
    check_pair,
    check_positive,
    check_reduction,
    check_same_device,
)
from kdloss.functional._autograd import ab_hinge, energy_distance, ft_paper, vid_reduced
from kdloss.functional._spatial import pool_pair, spatial_energy, unit_rows

__all__ = ["FTVariant", "ab_loss", "ft_loss", "hcl_loss", "vid_loss"]

FTVariant = Literal["paper", "repdistiller"]
"""Which factor-transfer loss :func:`ft_loss` computes: ``"paper"`` normalises the whole
flattened factor (Kim et al.'s equation); ``"repdistiller"`` normalises the factor's channel mean
of ``|F|^p1``, a length ``H * W`` map (RepDistiller's ``FactorTransfer``)."""

_FT_VARIANTS: tuple[str, ...] = ("paper", "repdistiller")


def _check_pair(ns: str, s: Tensor, nt: str, t: Tensor, hint: str) -> None:
    check_pair(ns, s, nt, t, hint=hint)
    if s.ndim < 2:
        raise ShapeError(f"{ns} must be (B, ...) with a feature dimension, got shape {tuple(s.shape)}")


def vid_loss(
    pred_mean: Tensor,
    teacher_features: Tensor,
    variance: Tensor,
    *,
    reduction: Reduction = "mean",
) -> Tensor:
    r"""Variational information distillation: Gaussian negative log-likelihood of the teacher.

    The student predicts the teacher's feature with a mean :math:`\mu(s)` (a small regressor on
    the student's feature) and a learned per-channel variance :math:`\sigma_c^2` (see
    :class:`kdloss.VIDRegressor`); the loss is the negative log-likelihood of
    the teacher feature :math:`t` without the constant :math:`\frac12\log 2\pi`:

    .. math::

        \ell_{b,c,h,w} = \log \sigma_c + \frac{(t_{b,c,h,w} - \mu_{b,c,h,w})^2}{2 \sigma_c^2} .

    Maximising this likelihood maximises a variational lower bound of the mutual information
    between teacher and student features. Teacher detached; float32 compute.

    Reductions: ``"none"`` keeps the element-wise :math:`\ell`; ``"mean"`` (default, as in the
    authors' and RepDistiller's code) averages over all elements; ``"batchmean"`` sums over
    :math:`c, h, w` and averages over the batch (the paper's per-sample sum); ``"sum"`` sums.

    Args:
        pred_mean: ``(B, C, *)`` predicted mean (the regressor's output on the student feature).
        teacher_features: ``(B, C, *)`` teacher feature; detached inside.
        variance: ``(C,)`` positive per-channel variances :math:`\sigma_c^2` (trainable upstream);
            a value <= 0 raises (CPU tensors; on CUDA it is not read, to avoid a synchronisation).
        reduction: ``"none" | "mean" | "batchmean" | "sum"``.

    Raises:
        TypeError: non-floating inputs.
        ShapeError: ``pred_mean`` and the teacher of different shapes, ``variance`` not ``(C,)``.
        ValueError: an unknown ``reduction``, different devices, a ``variance`` <= 0 (CPU tensors).

    Ahn, Hu, Damianou, Lawrence & Dai, *Variational Information Distillation for Knowledge
    Transfer*, CVPR 2019.

    Example:
        >>> import torch
        >>> from kdloss.functional import vid_loss
        >>> t = torch.zeros(2, 3, 4, 4)
        >>> vid_loss(t + 1.0, t, torch.ones(3))
        tensor(0.5000)
    """
    _check_pair("pred_mean", pred_mean, "teacher_features", teacher_features, "pred_mean predicts the teacher feature")
    check_float("variance", variance)
    check_same_device(pred_mean=pred_mean, variance=variance)
    channels = pred_mean.shape[1]
    if variance.shape != (channels,):
        raise ShapeError(f"variance must have shape (C,) = ({channels},), got {tuple(variance.shape)}")
    check_reduction(reduction)
    # log of a variance <= 0 is NaN: checked where it is free (CPU, eager); on CUDA it would wait
    # for the device every step (VIDRegressor's softplus variance is positive by construction).
    dtype = compute_dtype(pred_mean, teacher_features, variance)
    mu, t, var = in_dtype(pred_mean, dtype), in_dtype(detached(teacher_features), dtype), in_dtype(variance, dtype)
    if reduction == "none":
        if variance.device.type == "cpu" and not torch.compiler.is_compiling():
            _check_variance(variance)
        v = var.view(1, channels, *([1] * (pred_mean.ndim - 2)))
        return 0.5 * ((t - mu).square() / v + v.log())
    numel = mu.numel()
    factor = (
        1.0 / max(numel, 1) if reduction == "mean" else 1.0 / max(mu.shape[0], 1) if reduction == "batchmean" else 1.0
    )
    loss = vid_reduced(mu, t, var, factor=factor)  # one autograd.Function: two passes forward, one backward
    # a variance <= 0 makes log(var), and so the loss, NaN or -inf: read where it is free (CPU, eager)
    if variance.device.type == "cpu" and not torch.compiler.is_compiling() and not math.isfinite(loss.item()):
        _check_variance(variance)
    return loss


def _factor(reduction: str, x: Tensor) -> float:
    """The factor of an element sum: ``1 / numel`` (``"mean"``), ``1 / B`` (``"batchmean"``) or 1 (``"sum"``)."""
    if reduction == "mean":
        return 1.0 / max(x.numel(), 1)
    return 1.0 / max(x.shape[0], 1) if reduction == "batchmean" else 1.0


def _check_variance(variance: Tensor) -> None:
    if bool((variance <= 0).any()):
        raise ValueError(f"variance must be > 0 in every channel, got minimum {float(variance.min())}")


def ab_loss(
    student_preact: Tensor,
    teacher_preact: Tensor,
    *,
    margin: float = 1.0,
    reduction: Reduction = "batchmean",
) -> Tensor:
    r"""Activation-boundary transfer: a squared hinge that puts the student's pre-activations on
    the teacher's side of the ReLU boundary, by a margin.

    With :math:`\rho(t) = \mathbb{1}[t > 0]` the teacher's activation pattern and :math:`r(s)`
    the student's pre-activation after its connector
    (:class:`kdloss.ABConnector`),

    .. math::

        \ell = \rho(t) \odot \max(0, \mu - r(s))^2 + (1 - \rho(t)) \odot \max(0, \mu + r(s))^2 ,

    the paper's :math:`\lVert \rho(t) \odot \sigma(\mu 1 - r(s)) + (1 - \rho(t)) \odot
    \sigma(\mu 1 + r(s)) \rVert_2^2` with :math:`\sigma` = ReLU, element by element. Teacher
    detached (only its sign is used); float32 compute. In the paper AB is an initialisation
    stage: student and connectors are first trained with this loss alone, then the student is
    trained with cross-entropy (and optionally KD).

    Reductions: ``"none"`` keeps the element-wise :math:`\ell`; ``"batchmean"`` (default, the
    paper's squared norm per sample averaged over the batch); ``"mean"`` averages over all
    elements; ``"sum"`` sums. The authors' code further divides by 1000 and weights layers;
    pass such weights yourself.

    Args:
        student_preact: ``(B, C, *)`` connector output on the student's pre-ReLU feature.
        teacher_preact: ``(B, C, *)`` the teacher's pre-ReLU feature; detached inside.
        margin: :math:`\mu > 0` (1 in the paper).
        reduction: ``"none" | "mean" | "batchmean" | "sum"``.

    Raises:
        TypeError: non-floating inputs.
        ShapeError: different shapes (use a connector), no feature dimension.
        ValueError: ``margin <= 0``, an unknown ``reduction``, different devices.

    Heo, Lee, Yun & Choi, *Knowledge Transfer via Distillation of Activation Boundaries Formed
    by Hidden Neurons*, AAAI 2019.

    Example:
        >>> import torch
        >>> from kdloss.functional import ab_loss
        >>> t = torch.tensor([[1.0, -1.0]])
        >>> ab_loss(torch.tensor([[2.0, -2.0]]), t)
        tensor(0.)
        >>> ab_loss(torch.tensor([[0.0, 0.0]]), t)
        tensor(2.)
    """
    _check_pair(
        "student_preact",
        student_preact,
        "teacher_preact",
        teacher_preact,
        "map the student feature with an ABConnector first",
    )
    check_positive("margin", margin)
    check_reduction(reduction)
    s = in_dtype(student_preact, compute_dtype(student_preact, teacher_preact))
    t = detached(teacher_preact)
    if reduction == "none":  # max(0, m - sigma s)^2 element by element, sigma = +1 where the teacher is on
        return torch.where(t > 0, -s, s).add(margin).clamp(min=0.0).square()
    return ab_hinge(s, t, margin=margin, factor=_factor(reduction, s))  # one autograd.Function, analytic backward


def ft_loss(
    student_factor: Tensor,
    teacher_factor: Tensor,
    *,
    p: int = 1,
    reduction: Reduction = "batchmean",
    variant: FTVariant = "paper",
    factor_p: float | None = None,
) -> Tensor:
    r"""Factor transfer: distance between the normalised factors of student and teacher.

    The teacher factor :math:`F_T` is the encoder output of a paraphraser trained to reconstruct
    the teacher's feature; the student factor :math:`F_S` the output of a translator on the
    student's feature (:class:`kdloss.FTParaphraser`,
    :class:`kdloss.FTTranslator`). Two variants:

    ``variant="paper"`` (default, Kim et al.'s equation): the whole flattened factor is
    L2-normalised, per sample

    .. math::

        \ell = \Big\lVert \frac{F_T}{\lVert F_T \rVert_2} - \frac{F_S}{\lVert F_S \rVert_2}
        \Big\rVert_p, \qquad p \in \{1, 2\},

    over the :math:`D = K H W` entries of a ``(B, K, H, W)`` factor (any ``(B, *)`` shape works).

    ``variant="repdistiller"`` (RepDistiller's ``FactorTransfer``): each factor is first reduced
    to a spatial map like an attention map, the channel mean of :math:`|F|^{p_1}`
    (``factor_p``, 2 by default; RepDistiller writes ``F.pow(p1)``, equal for even :math:`p_1`),
    flattened and L2-normalised, :math:`\phi(F) = \mathrm{vec}(\frac1K\sum_k |F_k|^{p_1}) /
    \lVert\cdot\rVert_2`, a length :math:`hw` vector; factors of different spatial sizes are
    first average-pooled to :math:`h \times w = \min(H_s, H_t) \times \min(W_s, W_t)` (as
    :func:`kdloss.functional.attention_loss` with ``pool="features"``). Per sample

    .. math::

        \ell = \sum_{i=1}^{hw} \big|\phi(F_S)_i - \phi(F_T)_i\big|^p ,

    the elementwise :math:`|\Delta|^p` (``p = 2`` is the *squared* difference here, as
    RepDistiller's ``pow(p2)``, not the norm of the paper variant). RepDistiller's value is this
    with ``p = 1`` and ``reduction="mean"``: :math:`\sum_b \ell_b / (B\,hw)`, weight 200 in
    its CIFAR-100 commands.

    The two variants are different losses: ``reduction="mean"`` of the paper variant divides the
    paper's :math:`\ell_1` norm over :math:`D = KHW` entries by :math:`B D`; it is *not*
    RepDistiller's FT, whose entries are the :math:`hw` channel-pooled energies.

    Teacher detached; float32 compute (float64 stays float64).

    Reductions: ``"none"``: :math:`\ell` per sample ``(B,)``; ``"batchmean"`` (default) its mean
    over the batch; ``"mean"``: :math:`\sum_b \ell_b / (B E)`, :math:`E` the entries per sample
    (:math:`D` for the paper variant, :math:`hw` for the RepDistiller variant); ``"sum"``: the sum.

    Args:
        student_factor: translator output, ``(B, *)`` for the paper variant, ``(B, K_s, H_s, W_s)``
            for the RepDistiller variant.
        teacher_factor: paraphraser factor, same shape for the paper variant, ``(B, K_t, H_t, W_t)``
            for the RepDistiller variant (channels and sizes may differ); detached inside.
        p: 1 (paper, RepDistiller) or 2.
        reduction: ``"none" | "mean" | "batchmean" | "sum"``.
        variant: ``"paper"`` or ``"repdistiller"``.
        factor_p: the exponent :math:`p_1` of the RepDistiller variant (a number > 0; ``None``
            means 2). Must stay ``None`` for the paper variant, which has no such exponent.

    Raises:
        TypeError: non-floating factors.
        ShapeError: different shapes (paper variant), maps that are not 4-D (RepDistiller
            variant), different batch sizes, no feature dimension.
        ValueError: ``p`` not 1 or 2, an unknown ``reduction`` or ``variant``, ``factor_p`` given
            for the paper variant or not > 0, different devices.

    Kim, Park & Kwak, *Paraphrasing Complex Network: Network Compression via Factor Transfer*,
    NeurIPS 2018.

    Example:
        >>> import torch
        >>> from kdloss.functional import ft_loss
        >>> ft_loss(torch.tensor([[3.0, 4.0]]), torch.tensor([[6.0, 8.0]]))
        tensor(0.)
        >>> ft_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]))
        tensor(2.)
        >>> s = torch.tensor([[[[1.0, 0.0]], [[1.0, 0.0]]]])  # (1, 2, 1, 2): energy only at position 0
        >>> t = torch.tensor([[[[0.0, 3.0]]]])  # (1, 1, 1, 2): energy only at position 1
        >>> ft_loss(s, t, variant="repdistiller", reduction="mean")
        tensor(1.)
    """
    if variant not in _FT_VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(map(repr, _FT_VARIANTS))}, got {variant!r}")
    if p not in (1, 2) or isinstance(p, bool):
        raise ValueError(f"p must be 1 or 2, got {p!r}")
    check_reduction(reduction)
    if variant == "paper":
        if factor_p is not None:
            raise ValueError(
                f"factor_p is the channel exponent of variant='repdistiller'; the paper variant has none, "
                f"got factor_p={factor_p!r}"
            )
        _check_pair("student_factor", student_factor, "teacher_factor", teacher_factor, "the translator's output size")
        dtype = compute_dtype(student_factor, teacher_factor)
        sf, tf = in_dtype(student_factor, dtype).flatten(1), in_dtype(detached(teacher_factor), dtype).flatten(1)
        if not torch.compiler.is_compiling():  # one autograd.Function (compiled graphs fuse the plain form)
            red = {"none": 0, "sum": 1, "batchmean": max(sf.shape[0], 1)}.get(reduction)
            divisor = red if red is not None else max(sf.shape[0] * sf.shape[1], 1)
            return ft_paper(sf, tf, p=p, divisor=divisor)
        s, t = unit_rows(sf), unit_rows(tf)
    else:
        exponent = 2.0 if factor_p is None else check_positive("factor_p", factor_p)
        check_float("student_factor", student_factor)
        check_float("teacher_factor", teacher_factor)
        check_same_device(student_factor=student_factor, teacher_factor=teacher_factor)
        for name, f in (("student_factor", student_factor), ("teacher_factor", teacher_factor)):
            if f.ndim != 4:
                raise ShapeError(
                    f"ft_loss(variant='repdistiller') needs {name} as a (B, K, H, W) map, got shape {tuple(f.shape)}"
                )
        check_batch("student_factor", student_factor, "teacher_factor", teacher_factor)
        fs, ft = pool_pair(student_factor, detached(teacher_factor))
        if exponent == 2.0:
            # one autograd.Function over the unit energy maps (as attention transfer's)
            red = {"none": 0, "sum": 1, "batchmean": max(fs.shape[0], 1)}.get(reduction)
            divisor = red if red is not None else max(fs.shape[0] * fs.shape[-2] * fs.shape[-1], 1)
            return energy_distance([fs], [ft], scale=1.0, mode=p, divisor=divisor)
        s = unit_rows(spatial_energy(fs, exponent).flatten(1))
        t = unit_rows(spatial_energy(ft, exponent).flatten(1))
    diff = t - s
    # the L1 norm (sum |diff|), the L2 norm (its gradient at 0 is 0, by vector_norm's backward) or,
    # for the RepDistiller variant with p = 2, the sum of squares
    if p == 1:
        per_sample = torch.linalg.vector_norm(diff, ord=1, dim=1)
    elif variant == "repdistiller":
        per_sample = diff.square().sum(dim=1)
    else:
        per_sample = torch.linalg.vector_norm(diff, dim=1)
    return reduce_loss(per_sample, reduction, rows=per_sample.shape[0], elements_per_row=s.shape[1])


def hcl_loss(
    student_features: Tensor | Sequence[Tensor],
    teacher_features: Tensor | Sequence[Tensor],
    *,
    levels: Sequence[int] = (4, 2, 1),
) -> Tensor:
    r"""ReviewKD's hierarchical context loss: MSE at full resolution and on pooled pyramids.

    For each pair of same-shape maps (the student's fused features from
    :class:`kdloss.ReviewKDFusion` against the teacher's), with
    :math:`P_l` = adaptive average pooling to :math:`l \times l`,

    .. math::

        \ell = \frac{\mathrm{MSE}(f_s, f_t) + \sum_{k} 2^{-k}\, \mathrm{MSE}(P_{l_k} f_s, P_{l_k} f_t)}
        {1 + \sum_k 2^{-k}},

    over the levels :math:`l_k` (``levels``, :math:`k = 1, 2, \ldots`) that are smaller than the
    map's height (larger ones are skipped); the loss is the sum of :math:`\ell` over pairs. This
    is the authors' code's weighting (the paper describes the pyramid without the weights).
    Teacher detached; float32 compute.

    Reductions: none; MSE is the mean over all elements of each (pooled) map, as in the authors'
    code. Its weight is a hyper-parameter of the recipe.

    Args:
        student_features: one ``(B, C, H, W)`` map or a sequence of them.
        teacher_features: the teacher maps, same shapes.
        levels: pooled sizes, in the order they are weighted (the authors': 4, 2, 1).

    Raises:
        TypeError: non-floating maps.
        ShapeError: maps not 4-D or of different shapes.
        ValueError: an empty sequence, different lengths, a level < 1, different devices.

    Chen, Liu, Zhao & Jia, *Distilling Knowledge via Knowledge Review*, CVPR 2021.

    Example:
        >>> import torch
        >>> from kdloss.functional import hcl_loss
        >>> hcl_loss(torch.ones(2, 3, 8, 8), torch.zeros(2, 3, 8, 8))
        tensor(1.)
    """
    s_list, t_list = pair_up(student_features, teacher_features, one="feature map", many="maps")
    levels = tuple(levels)
    for level in levels:
        if isinstance(level, bool) or not isinstance(level, int) or level < 1:
            raise ValueError(f"levels must be integers >= 1, got {levels!r}")
    terms: list[Tensor] = []
    for j, (fs, ft) in enumerate(zip(s_list, t_list)):
        ns, nt = f"student_features[{j}]", f"teacher_features[{j}]"
        _check_pair(ns, fs, nt, ft, "ReviewKD fuses the student features to the teacher's shapes")
        if fs.ndim != 4:
            raise ShapeError(f"{ns} must be a (B, C, H, W) feature map, got shape {tuple(fs.shape)}")
        dtype = compute_dtype(fs, ft)
        s, t = in_dtype(fs, dtype), in_dtype(detached(ft), dtype)
        if s.numel() == 0:  # an empty batch: 0, not mse_loss's NaN
            terms.append(s.sum())
            continue
        loss = F.mse_loss(s, t)
        weight, weights = 1.0, 1.0
        s_src, t_src = s, t  # the maps the next level is pooled from
        for level in levels:
            if level >= s.shape[-2]:
                continue
            weight /= 2.0
            # Pool from the previous level's map when its bins are unions of that map's (the map's
            # size divides the full size, the level divides the map's): the same averages, from a
            # map 4x or 16x smaller than the full one.
            h, w = s_src.shape[-2:]
            if not (s.shape[-2] % h == 0 and s.shape[-1] % w == 0 and h % level == 0 and w % level == 0):
                s_src, t_src = s, t
            ps, pt = F.adaptive_avg_pool2d(s_src, (level, level)), F.adaptive_avg_pool2d(t_src, (level, level))
            loss = torch.add(loss, F.mse_loss(ps, pt), alpha=weight)
            weights += weight
            s_src, t_src = ps, pt
        terms.append(loss / weights if weights != 1.0 else loss)
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total
