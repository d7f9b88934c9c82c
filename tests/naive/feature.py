"""Plain references of the feature methods (VID, AB, FT and RepDistiller's form, ReviewKD's HCL), written from
the papers' equations.

Loops and explicit sums, no masking tricks, no numerical care beyond the equations: they are
slow and only meant for tiny float64 tensors in tests (and as benchmark baselines).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def vid(mean: Tensor, t: Tensor, var: Tensor) -> Tensor:
    """Ahn et al. 2019: mean over elements of log sigma_c + (t - mu)^2 / (2 sigma_c^2)."""
    v = var.view(1, -1, 1, 1)
    return (torch.log(torch.sqrt(v)) + (t - mean) ** 2 / (2 * v)).mean()


def ab(s: Tensor, t: Tensor, margin: float) -> Tensor:
    """Heo et al. 2019 (authors' criterion): (s+m)^2 [s>-m, t<=0] + (s-m)^2 [s<=m, t>0], summed / B."""
    loss = (s + margin) ** 2 * ((s > -margin) & (t <= 0)).to(s.dtype) + (s - margin) ** 2 * (
        (s <= margin) & (t > 0)
    ).to(s.dtype)
    return loss.sum() / s.shape[0]


def ft(s: Tensor, t: Tensor, p: int) -> Tensor:
    """Kim et al. 2018: || F_T/||F_T|| - F_S/||F_S|| ||_p per sample, mean over the batch."""
    B = s.shape[0]
    s, t = s.reshape(B, -1), t.reshape(B, -1)
    s = s / torch.sqrt((s**2).sum(dim=1, keepdim=True))
    t = t / torch.sqrt((t**2).sum(dim=1, keepdim=True))
    d = t - s
    per = d.abs().sum(dim=1) if p == 1 else torch.sqrt((d**2).sum(dim=1))
    return per.mean()


def ft_repdistiller(fs: Tensor, ft: Tensor, p1: float = 2.0, p2: int = 1) -> Tensor:
    """RepDistiller's FactorTransfer (square maps): pool the map with the larger height to the other's
    (h, h), factor(F) = normalize(mean_c F^p1 flattened), mean over B x hw of |diff| (p2 = 1) or diff^p2."""
    s_h, t_h = fs.shape[2], ft.shape[2]
    if s_h > t_h:
        fs = F.adaptive_avg_pool2d(fs, (t_h, t_h))
    elif s_h < t_h:
        ft = F.adaptive_avg_pool2d(ft, (s_h, s_h))

    def factor(f: Tensor) -> Tensor:
        q = f.pow(p1).mean(1).view(f.size(0), -1)
        return q / torch.sqrt((q**2).sum(dim=1, keepdim=True))

    d = factor(fs) - factor(ft)
    return d.abs().mean() if p2 == 1 else d.pow(p2).mean()


def ft_repdistiller_any_size(fs: Tensor, ft: Tensor) -> Tensor:
    """The same with both maps pooled to (min H, min W) (non-square maps), p1 = 2, p2 = 1."""
    size = (min(fs.shape[2], ft.shape[2]), min(fs.shape[3], ft.shape[3]))
    qs = F.adaptive_avg_pool2d(fs, size).pow(2).mean(1).flatten(1)
    qt = F.adaptive_avg_pool2d(ft, size).pow(2).mean(1).flatten(1)
    qs = qs / torch.sqrt((qs**2).sum(dim=1, keepdim=True))
    qt = qt / torch.sqrt((qt**2).sum(dim=1, keepdim=True))
    return (qs - qt).abs().mean()


def hcl(fs: list[Tensor], ft: list[Tensor]) -> Tensor:
    """Chen et al. 2021 (authors' code): MSE + halving weights on 4x4, 2x2, 1x1 pools, normalised."""
    total = 0
    for s, t in zip(fs, ft):
        loss = F.mse_loss(s, t)
        cnt, tot = 1.0, 1.0
        for level in (4, 2, 1):
            if level >= s.shape[2]:
                continue
            cnt /= 2.0
            loss = loss + F.mse_loss(F.adaptive_avg_pool2d(s, level), F.adaptive_avg_pool2d(t, level)) * cnt
            tot += cnt
        total = total + loss / tot
    return total
