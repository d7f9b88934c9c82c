"""Plain references for the distillation methods (DKD, DIST, SP, CC, RKD, PKT, ...), written from the papers' equations.

Loops and explicit sums, no masking tricks, no numerical care beyond the equations: they are
slow and only meant for tiny float64 tensors in tests (and as benchmark baselines).
"""

from __future__ import annotations

import math

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


def pkt_repdistiller(s: Tensor, t: Tensor, eps: float = 1e-7) -> Tensor:
    """RepDistiller's PKT: eps in the norms and inside the log ratio, mean over the B x B entries."""

    def cond(e: Tensor) -> Tensor:
        e = e / (torch.sqrt((e**2).sum(dim=1, keepdim=True)) + eps)
        k = (e @ e.T + 1.0) / 2.0
        return k / k.sum(dim=1, keepdim=True)

    ps, pt = cond(s), cond(t)
    return (pt * torch.log((pt + eps) / (ps + eps))).mean()


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
