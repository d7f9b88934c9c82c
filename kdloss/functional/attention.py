"""Attention transfer (Zagoruyko & Komodakis, 2017)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch.nn.functional as F
from torch import Tensor

from kdloss import kernels as _kernels
from kdloss._numerics import detached, pair_up, reduce_loss
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
from kdloss.functional._autograd import attention_p2
from kdloss.functional._spatial import common_size, pool_pair, pool_to, spatial_energy

__all__ = ["AttentionPool", "attention_loss", "attention_map"]

AttentionPool = Literal["features", "maps"]
"""How :func:`attention_loss` pairs feature maps of different spatial sizes: ``"features"`` (the
default, RepDistiller's and mdistiller's) average-pools the larger *feature map* to the common
size and then takes its attention map; ``"maps"`` takes both attention maps' channel energy first
and average-pools the larger energy map."""

_POOLS: tuple[str, ...] = ("features", "maps")


def attention_map(feature: Tensor, *, p: float = 2.0, eps: float = 1e-12) -> Tensor:
    r"""Spatial attention map of a feature map: channel mean of :math:`|f|^p`, flattened, L2-normalised.

    .. math::

        a(f)_b = \frac{\mathrm{vec}(Q_b)}{\lVert \mathrm{vec}(Q_b) \rVert_2}, \qquad
        Q_{b,h,w} = \frac{1}{C} \sum_c |f_{b,c,h,w}|^p

    (The paper sums over channels; the channel mean differs by the factor :math:`1/C`, which the
    normalisation removes.)

    Args:
        feature: ``(B, C, H, W)`` feature map.
        p: the exponent, 2 in the paper.
        eps: lower bound of the norm, so that an all-zero map gives zeros, not NaN.

    Raises:
        ShapeError: if ``feature`` is not 4-D. TypeError: if it is not floating point.
        ValueError: if ``p`` or ``eps`` is not a finite number > 0.

    Returns:
        ``(B, H * W)`` unit-norm maps in float32 (float64 for float64 input).

    Example:
        >>> import torch
        >>> from kdloss.functional import attention_map
        >>> attention_map(torch.ones(1, 3, 2, 2))
        tensor([[0.5000, 0.5000, 0.5000, 0.5000]])
    """
    check_float("feature", feature)
    if feature.ndim != 4:
        raise ShapeError(f"feature must be a (B, C, H, W) feature map, got shape {tuple(feature.shape)}")
    check_positive("p", p)
    check_positive("eps", eps)
    return F.normalize(spatial_energy(feature, p).flatten(1), dim=1, eps=eps)


def attention_loss(
    student_features: Tensor | Sequence[Tensor],
    teacher_features: Tensor | Sequence[Tensor],
    *,
    p: float = 2.0,
    beta: float = 1.0,
    reduction: Reduction = "mean",
    pool: AttentionPool = "features",
) -> Tensor:
    r"""Attention transfer: squared distance between normalised attention maps, summed over pairs.

    .. math::

        \mathcal{L} = \beta \sum_{j} \frac{1}{hw} \sum_{i}
        \big(a(P f^{(j)}_s)_{b,i} - a(P f^{(j)}_t)_{b,i}\big)^2

    where :math:`a` is :func:`attention_map` and :math:`P` pools a map to the pair's common
    spatial size :math:`h \times w = \min(H_s, H_t) \times \min(W_s, W_t)` (the identity when
    both maps already have that size). Student and teacher may have different channel counts.
    The teacher is detached.

    Pairs whose spatial sizes differ are resized in one of two ways (``pool``):

    - ``"features"`` (default): :math:`P` is ``adaptive_avg_pool2d`` of the **feature map** to
      :math:`(h, w)`, then the attention map is taken,
      :math:`Q_{b,h',w'} = \frac1C\sum_c |(P f)_{b,c,h',w'}|^p`. This is RepDistiller's and
      mdistiller's ``at_loss`` (they pool the map with the larger height to the other's height,
      square, and compare heights only); for non-square maps the height and the width are each
      taken from the smaller map.
    - ``"maps"``: the channel energy :math:`Q = \frac1C\sum_c |f|^p` of each map is taken at its
      own size and the larger :math:`Q` is average-pooled to :math:`(h, w)` before normalising,
      :math:`a = \mathrm{vec}(P Q) / \lVert \mathrm{vec}(P Q) \rVert_2`. Averages of squares
      are smoother, more uniform maps than squares of averages, so its values are typically
      smaller than the ``"features"`` form's and its gradients differ (``docs/fidelity.md``).

    The two agree exactly when the sizes are equal.

    Zagoruyko & Komodakis, *Paying More Attention to Attention*, ICLR 2017; their code uses
    ``beta = 1000`` with this per-pair mean (RepDistiller's and mdistiller's CIFAR-100 weight, see
    ``docs/fidelity.md`` for rescaling it).

    Reductions: ``"none"`` gives the per-sample loss ``(B,)`` (mean over positions, summed over
    pairs, times ``beta``); ``"mean"`` (default) and ``"batchmean"`` its mean over the batch;
    ``"sum"`` its sum.

    On CUDA (float32/bfloat16/float16, ``p = 2``, outside ``torch.compile``) the loss runs as
    fused Triton kernels, one launch forward and one backward for up to 4 pairs, whenever every
    pair has equal spatial sizes once resized: always with ``pool="features"`` (the pooling runs
    first, in PyTorch), only for pairs of equal sizes with ``pool="maps"`` (see
    ``docs/kernels.md``; ``KDLOSS_KERNELS=off`` turns them off).

    Args:
        student_features: one ``(B, C_s, H, W)`` map or a sequence of them.
        teacher_features: the teacher maps, as many as the student's.
        p: exponent of the attention map (2).
        beta: weight of the whole term.
        reduction: ``"none" | "mean" | "batchmean" | "sum"``.
        pool: ``"features"`` (default) or ``"maps"``: how maps of different spatial sizes are
            brought to a common size (see above).

    Raises:
        ValueError: if the two sequences differ in length or are empty, ``p`` is not > 0, ``beta``
            is not a finite number >= 0, ``reduction`` or ``pool`` is unknown; different devices.
        TypeError: for non-floating-point feature maps or a ``beta`` that is not a number.
        ShapeError: if a map is not 4-D or the batch sizes differ.

    Example:
        >>> import torch
        >>> from kdloss.functional import attention_loss
        >>> s = [torch.ones(2, 8, 4, 4), torch.ones(2, 16, 2, 2)]
        >>> t = [torch.ones(2, 32, 8, 8), torch.ones(2, 64, 2, 2)]
        >>> attention_loss(s, t)
        tensor(0.)
        >>> s = torch.tensor([[[[1.0, -1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]]])  # (1, 1, 2, 4)
        >>> t = torch.ones(1, 1, 2, 2)
        >>> attention_loss(s, t, pool="features"), attention_loss(s, t, pool="maps")
        (tensor(0.2500), tensor(0.1464))
    """
    s_list, t_list = pair_up(student_features, teacher_features, one="feature map", many="maps")
    check_positive("p", p)
    check_nonnegative("beta", beta)
    check_reduction(reduction)
    check_pool(pool)

    batch = s_list[0].shape[0] if isinstance(s_list[0], Tensor) and s_list[0].ndim else -1
    for j, (fs, ft) in enumerate(zip(s_list, t_list)):
        if (  # the usual pair in one expression; anything else goes through the checks that explain it
            isinstance(fs, Tensor)
            and isinstance(ft, Tensor)
            and fs.ndim == 4
            and ft.ndim == 4
            and fs.shape[0] == batch
            and ft.shape[0] == batch
            and fs.device == ft.device
            and fs.is_floating_point()
            and ft.is_floating_point()
        ):
            continue
        name_s, name_t = f"student_features[{j}]", f"teacher_features[{j}]"
        check_float(name_s, fs)
        check_float(name_t, ft)
        check_same_device(**{name_s: fs, name_t: ft})
        for name, f in ((name_s, fs), (name_t, ft)):
            if f.ndim != 4:
                raise ShapeError(f"{name} must be a (B, C, H, W) feature map, got shape {tuple(f.shape)}")
        check_batch(name_s, fs, name_t, ft)
        if j > 0:
            check_batch("student_features[0]", s_list[0], name_s, fs)

    if pool == "features":
        # Resize the feature maps themselves; from here on every pair has equal spatial sizes.
        resized = [pool_pair(fs, detached(ft)) for fs, ft in zip(s_list, t_list)]
        s_list, t_list = [fs for fs, _ in resized], [ft for _, ft in resized]

    # The fused kernels handle pairs of equal spatial sizes only (attention_fusable checks): with
    # pool="features" that is every pair here; with pool="maps", unequal pairs stay eager.
    if _kernels.attention_fusable(s_list, t_list, p):  # CUDA + Triton, p = 2, equal spatial sizes per pair
        rows = _kernels.run_guarded(  # None: the launch failed, take the eager path
            "attention", s_list[0], t_list[0], _kernels.fused_attention_rows, s_list, t_list, beta=beta
        )
        if rows is not None:
            return reduce_loss(rows, reduction, rows=rows.shape[0])

    if p == 2 and all(fs.shape[-2:] == ft.shape[-2:] for fs, ft in zip(s_list, t_list)):
        # one autograd.Function: one pass over each map forward, one over each student map backward
        return attention_p2(s_list, t_list, beta=beta, reduction=reduction)

    per_pair: list[Tensor] = []
    for fs, ft in zip(s_list, t_list):
        qs, qt = spatial_energy(fs, p), spatial_energy(ft.detach(), p)
        if qs.shape[-2:] != qt.shape[-2:]:  # pool="maps" only
            size = common_size(qs, qt)
            qs, qt = pool_to(qs, size), pool_to(qt, size)
        a_s = F.normalize(qs.flatten(1), dim=1, eps=1e-12)
        a_t = F.normalize(qt.flatten(1), dim=1, eps=1e-12)
        per_sample = (a_s - a_t).square().mean(dim=1)
        per_pair.append(per_sample)
    total = per_pair[0]
    for extra in per_pair[1:]:
        total = total + extra
    return reduce_loss(beta * total, reduction, rows=total.shape[0])


def check_pool(pool: str) -> AttentionPool:
    """Return ``pool`` if it is ``"features"`` or ``"maps"``, else raise a ``ValueError`` listing them.

    Example:
        >>> check_pool("maps")
        'maps'
    """
    if pool not in _POOLS:
        raise ValueError(f"pool must be one of {', '.join(map(repr, _POOLS))}, got {pool!r}")
    return pool  # type: ignore[return-value]
