"""Plain references of the relational methods (SP, CC, RKD, PKT, FSP, NST), written from the papers' equations.

Loops and explicit sums, no masking tricks, no numerical care beyond the equations: they are
slow and only meant for tiny float64 tensors in tests (and as benchmark baselines).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def sp(fs: Tensor, ft: Tensor) -> Tensor:
    """Tung & Mori 2019: ||G~_t - G~_s||_F^2 / B^2 with row-L2-normalised Gram matrices."""
    B = fs.shape[0]
    qs, qt = fs.reshape(B, -1), ft.reshape(B, -1)
    gs, gt = qs @ qs.T, qt @ qt.T
    gs = gs / torch.sqrt((gs**2).sum(dim=1, keepdim=True))
    gt = gt / torch.sqrt((gt**2).sum(dim=1, keepdim=True))
    return ((gt - gs) ** 2).sum() / B**2


def cc(fs: Tensor, ft: Tensor, gamma: float, order: int) -> Tensor:
    """Peng et al. 2019: Taylor-expanded Gaussian RBF correlation of unit embeddings, ||.||_F^2 / B^2."""

    def psi(f: Tensor) -> Tensor:
        f = f / torch.sqrt((f**2).sum(dim=1, keepdim=True))
        B = f.shape[0]
        out = torch.zeros(B, B, dtype=f.dtype)
        for i in range(B):
            for j in range(B):
                x = (f[i] * f[j]).sum()
                out[i, j] = sum(
                    math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * x**p for p in range(order + 1)
                )
        return out

    B = fs.shape[0]
    return ((psi(ft) - psi(fs)) ** 2).sum() / B**2


def cc_rbf_exact(fs: Tensor, ft: Tensor, gamma: float) -> Tensor:
    """The exact Gaussian-RBF version (the Taylor series' limit) for unit embeddings."""

    def psi(f: Tensor) -> Tensor:
        f = f / torch.sqrt((f**2).sum(dim=1, keepdim=True))
        return torch.exp(-gamma * ((f[:, None] - f[None]) ** 2).sum(-1))

    return ((psi(ft) - psi(fs)) ** 2).sum() / fs.shape[0] ** 2


def cc_repdistiller(fs: Tensor, ft: Tensor) -> Tensor:
    """RepDistiller's Correlation: mean over i of sum(|d_i| * |d_{i+1}|), d = f_s - f_t."""
    d = (fs - ft).abs()
    return torch.stack([(d[i] * d[i + 1]).sum() for i in range(d.shape[0] - 1)]).mean()


def huber(x: Tensor) -> Tensor:
    ax = x.abs()
    return torch.where(ax < 1, 0.5 * x**2, ax - 0.5)


def rkd(s: Tensor, t: Tensor, wd: float, wa: float, pairs: str) -> Tensor:
    """Park et al. 2019: Huber on distance (normalised by the mean distance) and angle potentials."""
    B = s.shape[0]

    def dists(e: Tensor) -> dict[tuple[int, int], Tensor]:
        d = {}
        for i in range(B):
            for j in range(B):
                if i != j:
                    d[(i, j)] = torch.sqrt(((e[i] - e[j]) ** 2).sum())
        mu = sum(d.values()) / len(d)
        return {k: v / mu for k, v in d.items()}

    def angle(e: Tensor, i: int, j: int, k: int) -> Tensor:
        a, b = e[j] - e[i], e[k] - e[i]
        return (a * b).sum() / torch.sqrt((a * a).sum() * (b * b).sum())

    ds, dt = dists(s), dists(t)
    dist_sum = sum(huber(ds[k] - dt[k]) for k in ds)
    ang_sum = s.new_zeros(())
    for i in range(B):
        for j in range(B):
            for k in range(B):
                if len({i, j, k}) == 3:
                    ang_sum = ang_sum + huber(angle(s, i, j, k) - angle(t, i, j, k))
    if pairs == "all":
        # degenerate pairs/triplets contribute 0 but count in the mean
        return wd * dist_sum / B**2 + wa * ang_sum / B**3
    return wd * dist_sum / (B * (B - 1)) + wa * ang_sum / (B * (B - 1) * (B - 2))


def pkt(s: Tensor, t: Tensor, include_self: bool) -> Tensor:
    """Passalis & Tefas 2018: sum_i sum_j p_t(j|i) log(p_t(j|i) / p_s(j|i)), cosine kernel (cos + 1)/2."""
    B = s.shape[0]

    def cond(e: Tensor) -> Tensor:
        k = torch.zeros(B, B, dtype=e.dtype)
        for i in range(B):
            for j in range(B):
                if include_self or i != j:
                    k[i, j] = 0.5 * ((e[i] * e[j]).sum() / torch.sqrt((e[i] ** 2).sum() * (e[j] ** 2).sum()) + 1)
        return k / k.sum(dim=1, keepdim=True)

    ps, pt = cond(s), cond(t)
    total = s.new_zeros(())
    for i in range(B):
        for j in range(B):
            if include_self or i != j:
                total = total + pt[i, j] * torch.log(pt[i, j] / ps[i, j])
    return total


def fsp_matrix(a: Tensor, b: Tensor) -> Tensor:
    """Yim et al. 2017: G_ij = sum_{h,w} a_i b_j / (h w), same spatial size."""
    B, C1, H, W = a.shape
    C2 = b.shape[1]
    g = torch.zeros(B, C1, C2, dtype=a.dtype)
    for i in range(C1):
        for j in range(C2):
            g[:, i, j] = (a[:, i] * b[:, j]).sum(dim=(1, 2)) / (H * W)
    return g


def fsp(s_feats: list[Tensor], t_feats: list[Tensor], variant: str) -> Tensor:
    """Sum over consecutive stage pairs of ||G_t - G_s||^2 (or its entry mean), mean over the batch."""
    per = 0
    for k in range(len(s_feats) - 1):
        d = (fsp_matrix(t_feats[k], t_feats[k + 1]) - fsp_matrix(s_feats[k], s_feats[k + 1])) ** 2
        per = per + (d.sum(dim=(1, 2)) if variant == "paper" else d.mean(dim=(1, 2)))
    return per.mean()


def nst(fs: Tensor, ft: Tensor, degree: int, bias: float) -> Tensor:
    """Huang & Wang 2017: squared MMD with kernel (x.y + c)^d between L2-normalised channel rows."""
    B = fs.shape[0]
    total = fs.new_zeros(())
    for b in range(B):
        s = fs[b].reshape(fs.shape[1], -1)
        t = ft[b].reshape(ft.shape[1], -1)
        s = s / torch.sqrt((s**2).sum(dim=1, keepdim=True))
        t = t / torch.sqrt((t**2).sum(dim=1, keepdim=True))
        Cs, Ct = s.shape[0], t.shape[0]

        def k(x: Tensor, y: Tensor) -> Tensor:
            return ((x * y).sum() + bias) ** degree

        tt = sum(k(t[i], t[j]) for i in range(Ct) for j in range(Ct)) / Ct**2
        ss = sum(k(s[i], s[j]) for i in range(Cs) for j in range(Cs)) / Cs**2
        st = sum(k(s[j], t[i]) for i in range(Ct) for j in range(Cs)) / (Cs * Ct)
        total = total + tt + ss - 2 * st
    return total / B


def pkt_repdistiller(s: Tensor, t: Tensor, eps: float = 1e-7) -> Tensor:
    """RepDistiller's PKT: eps in the norms and inside the log ratio, mean over the B x B entries."""

    def cond(e: Tensor) -> Tensor:
        e = e / (torch.sqrt((e**2).sum(dim=1, keepdim=True)) + eps)
        k = (e @ e.T + 1.0) / 2.0
        return k / k.sum(dim=1, keepdim=True)

    ps, pt = cond(s), cond(t)
    return (pt * torch.log((pt + eps) / (ps + eps))).mean()
