"""Spatial helpers shared by the feature-map losses (attention transfer, factor transfer).

``spatial_energy`` is the channel mean of ``|f|^p``, the attention map before normalising.

Both compare two maps at a common spatial size, the smaller height and the smaller width, after
adaptive average pooling of the larger map (RepDistiller's and mdistiller's rule, which compares
heights only and pools to a square; here both dimensions are taken from the smaller map, so
non-square maps pair up too).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdloss._numerics import compute_dtype, in_dtype

__all__ = ["common_size", "pool_pair", "pool_to", "spatial_energy", "unit_rows"]


def spatial_energy(feature: Tensor, p: float) -> Tensor:
    """Mean over channels of ``|f|^p``: ``(B, C, H, W) -> (B, H, W)`` in float32 or wider."""
    dtype = compute_dtype(feature)
    if p == 2:
        # |f|^2 = f^2: no |f| pass forward, and a gradient of 2 f (not 2 |f| sign(f)) backward
        return in_dtype(feature, dtype).square().mean(dim=1)
    a = in_dtype(feature, dtype).abs()
    if p < 1:
        # d|f|^p/df = p |f|^(p-1) is infinite at f = 0 for p < 1 (and ReLU features are exactly 0
        # in many places): the gradient there would be inf * 0 = NaN. Take the subgradient 0.
        nonzero = a > 0
        return torch.where(nonzero, torch.where(nonzero, a, 1.0).pow(p), 0.0).mean(dim=1)
    return a.pow(p).mean(dim=1)


def pool_to(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Adaptive average pooling of the last two dimensions (``(B, H, W)`` or ``(B, C, H, W)``) to ``size``.

    Sizes that divide evenly (the usual 32/16/8 maps) are pooled by a reshape and a mean, which
    equals ``adaptive_avg_pool2d`` there and also compiles with symbolic sizes (inductor of torch
    2.11 cannot lower ``adaptive_avg_pool2d`` to a symbolic ``Min`` size under ``dynamic=True``).
    """
    h, w = x.shape[-2], x.shape[-1]
    if h == size[0] and w == size[1]:
        return x
    lead = x.shape[:-2]
    if h % size[0] == 0 and w % size[1] == 0:
        return x.reshape(*lead, size[0], h // size[0], size[1], w // size[1]).mean(dim=(-3, -1))
    if x.ndim == 3:
        return F.adaptive_avg_pool2d(x.unsqueeze(1), size).squeeze(1)
    return F.adaptive_avg_pool2d(x, size)


def common_size(a: Tensor, b: Tensor) -> tuple[int, int]:
    """The spatial size two maps are compared at: the smaller height and the smaller width."""
    return min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1])


def pool_pair(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """``a`` and ``b`` average-pooled to :func:`common_size` (each unchanged if it already has it)."""
    size = common_size(a, b)
    return pool_to(a, size), pool_to(b, size)


def unit_rows(x: Tensor, dim: int = 1) -> Tensor:
    """``F.normalize(x, dim=dim)`` (``eps = 1e-12``), without its ``expand_as``: one operator fewer each way."""
    out: Tensor = x / torch.linalg.vector_norm(x, dim=dim, keepdim=True).clamp_min(1e-12)
    return out
