"""Textbook attention-transfer references (Zagoruyko & Komodakis, ICLR 2017) and the pooled variants."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def at_map(x: Tensor) -> Tensor:
    """Zagoruyko & Komodakis: F.normalize(x.pow(2).mean(1).view(B, -1))."""
    return F.normalize(x.pow(2).mean(1).view(x.size(0), -1))


def at_loss(student_features: list[Tensor], teacher_features: list[Tensor], beta: float = 1.0) -> Tensor:
    """Sum over pairs of (at(x) - at(y)).pow(2).mean(), times beta (same spatial sizes)."""
    return beta * sum((at_map(s) - at_map(t)).pow(2).mean() for s, t in zip(student_features, teacher_features))  # type: ignore[return-value]


def at_loss_pooled(student_feature: Tensor, teacher_feature: Tensor, beta: float = 1.0) -> Tensor:
    """Attention transfer for one pair whose spatial sizes differ by an integer factor.

    The larger map's channel mean of x^2 is average-pooled (kernel = stride = the factor) to the
    smaller size before flattening and normalising; then as :func:`at_loss`.
    """

    def q(x: Tensor) -> Tensor:
        return x.pow(2).mean(1, keepdim=True)

    qs, qt = q(student_feature), q(teacher_feature)
    if qs.shape[-1] > qt.shape[-1]:
        qs = F.avg_pool2d(qs, qs.shape[-1] // qt.shape[-1])
    elif qt.shape[-1] > qs.shape[-1]:
        qt = F.avg_pool2d(qt, qt.shape[-1] // qs.shape[-1])
    a_s = F.normalize(qs.view(qs.size(0), -1))
    a_t = F.normalize(qt.view(qt.size(0), -1))
    return beta * (a_s - a_t).pow(2).mean()


def at_loss_repdistiller(student_feature: Tensor, teacher_feature: Tensor, beta: float = 1.0) -> Tensor:
    """RepDistiller's / mdistiller's AT for one pair of square maps, as they write it.

    Only the heights are compared: the map with the larger height is adaptive-average-pooled to
    ``(h, h)``, ``h`` the other's height, then ``(at(f_s) - at(f_t)).pow(2).mean()``.
    """
    s_h, t_h = student_feature.shape[2], teacher_feature.shape[2]
    if s_h > t_h:
        student_feature = F.adaptive_avg_pool2d(student_feature, (t_h, t_h))
    elif s_h < t_h:
        teacher_feature = F.adaptive_avg_pool2d(teacher_feature, (s_h, s_h))
    return beta * (at_map(student_feature) - at_map(teacher_feature)).pow(2).mean()


def at_loss_pool_features(student_feature: Tensor, teacher_feature: Tensor, beta: float = 1.0) -> Tensor:
    """The same rule for any sizes: both feature maps adaptive-average-pooled to (min H, min W), then AT."""
    size = (
        min(student_feature.shape[2], teacher_feature.shape[2]),
        min(student_feature.shape[3], teacher_feature.shape[3]),
    )
    fs = F.adaptive_avg_pool2d(student_feature, size)
    ft = F.adaptive_avg_pool2d(teacher_feature, size)
    return beta * (at_map(fs) - at_map(ft)).pow(2).mean()


def at_loss_pool_maps(student_feature: Tensor, teacher_feature: Tensor, beta: float = 1.0) -> Tensor:
    """AT with the energy maps pooled: Q = mean_c x^2 of each map, adaptive-average-pooled to (min H, min W)."""
    size = (
        min(student_feature.shape[2], teacher_feature.shape[2]),
        min(student_feature.shape[3], teacher_feature.shape[3]),
    )
    qs = F.adaptive_avg_pool2d(student_feature.pow(2).mean(1, keepdim=True), size)
    qt = F.adaptive_avg_pool2d(teacher_feature.pow(2).mean(1, keepdim=True), size)
    a_s = F.normalize(qs.view(qs.size(0), -1))
    a_t = F.normalize(qt.view(qt.size(0), -1))
    return beta * (a_s - a_t).pow(2).mean()
