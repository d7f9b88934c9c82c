"""Plain references of the logit methods (DKD, Zhao et al., CVPR 2022, and mdistiller's form; DIST, Huang et
al., NeurIPS 2022), written from the papers' equations.

Loops and explicit sums, no masking tricks, no numerical care beyond the equations: they are
slow and only meant for tiny float64 tensors in tests (and as benchmark baselines).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def dkd(s: Tensor, t: Tensor, labels: Tensor, alpha: float, beta: float, temperature: float) -> Tensor:
    """Zhao et al. 2022, eq. (DKD): alpha*TCKD + beta*NCKD, T^2, averaged over the batch."""
    total = s.new_zeros(())
    B, C = s.shape
    for i in range(B):
        y = int(labels[i])
        p = torch.softmax(t[i] / temperature, dim=0)
        q = torch.softmax(s[i] / temperature, dim=0)
        bt = torch.stack([p[y], 1 - p[y]])
        bs = torch.stack([q[y], 1 - q[y]])
        tckd = (bt * (bt.log() - bs.log())).sum()
        keep = [c for c in range(C) if c != y]
        pn = torch.softmax(t[i, keep] / temperature, dim=0)
        qn = torch.softmax(s[i, keep] / temperature, dim=0)
        nckd = (pn * (pn.log() - qn.log())).sum()
        total = total + temperature**2 * (alpha * tckd + beta * nckd)
    return total / B


def kd_per_row(s: Tensor, t: Tensor, temperature: float) -> Tensor:
    p = torch.softmax(t / temperature, dim=1)
    q = torch.softmax(s / temperature, dim=1)
    return (p * (p.log() - q.log())).sum(dim=1)


def pearson(u: Tensor, v: Tensor) -> Tensor:
    u = u - u.mean()
    v = v - v.mean()
    return (u * v).sum() / torch.sqrt((u * u).sum() * (v * v).sum())


def dist(s: Tensor, t: Tensor, beta: float, gamma: float, temperature: float) -> Tensor:
    """Huang et al. 2022: beta T^2 mean_i d_p(rows) + gamma T^2 mean_j d_p(columns)."""
    ys = torch.softmax(s / temperature, dim=1)
    yt = torch.softmax(t / temperature, dim=1)
    B, C = ys.shape
    inter = sum(1 - pearson(ys[i], yt[i]) for i in range(B)) / B
    intra = sum(1 - pearson(ys[:, j], yt[:, j]) for j in range(C)) / C
    return temperature**2 * (beta * inter + gamma * intra)


def dkd_mdistiller(s: Tensor, t: Tensor, labels: Tensor, alpha: float, beta: float, temperature: float) -> Tensor:
    """mdistiller's DKD: binary probabilities through masks and torch.log, target logit - 1000 for NCKD."""
    gt = torch.zeros_like(s).scatter_(1, labels[:, None], 1.0)
    other = 1.0 - gt
    ps, pt = F.softmax(s / temperature, dim=1), F.softmax(t / temperature, dim=1)
    bs = torch.cat([(ps * gt).sum(1, keepdim=True), (ps * other).sum(1, keepdim=True)], dim=1)
    bt = torch.cat([(pt * gt).sum(1, keepdim=True), (pt * other).sum(1, keepdim=True)], dim=1)
    tckd = F.kl_div(torch.log(bs), bt, reduction="sum") * temperature**2 / s.shape[0]
    log_qs = F.log_softmax(s / temperature - 1000.0 * gt, dim=1)
    pt_n = F.softmax(t / temperature - 1000.0 * gt, dim=1)
    nckd = F.kl_div(log_qs, pt_n, reduction="sum") * temperature**2 / s.shape[0]
    return alpha * tckd + beta * nckd
