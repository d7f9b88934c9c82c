"""The reference implementations' formulations, vectorised as their authors write them: the baselines.

What a user would run instead of kdloss: each function computes its loss the way the public
reference code does (RepDistiller, mdistiller, the DIST and ReviewKD authors' code, PyTorch's
knowledge-distillation tutorial), written here from their formulas with plain autograd operators,
no masking and no numerical care beyond theirs. ``benchmarks/vs_reference.py`` times kdloss against
them, and ``tests/test_op_counts.py`` checks that kdloss dispatches no more operators (forward +
backward) than they do. The float64 references of the family modules (``tests/naive/<family>.py``)
check values; these check cost, so they are as lean as the reference code itself (and agree with
kdloss's values on ordinary inputs, which ``tests/test_op_counts.py`` checks too). Not re-exported
from :mod:`tests.naive`: their names are the methods', as the family modules' are.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ab",
    "at",
    "cc_paper",
    "cc_repdistiller",
    "cosine_hidden",
    "dist",
    "dkd",
    "fsp",
    "ft_paper",
    "ft_repdistiller",
    "hcl",
    "hint",
    "jsd",
    "kd",
    "kd_ce",
    "nst",
    "orthogonality",
    "paired_kd",
    "pkt",
    "reverse_kl",
    "rkd",
    "self_distillation",
    "sp",
    "vid",
]


# ------------------------------------------------------------------------------------ logits


def kd(s: Tensor, t: Tensor, temperature: float) -> Tensor:
    """Hinton's KD as RepDistiller's ``DistillKL``: ``kl_div(log_softmax(s/T), softmax(t/T), sum) * T^2 / B``."""
    log_q = F.log_softmax(s / temperature, dim=1)
    p = F.softmax(t / temperature, dim=1)
    return F.kl_div(log_q, p, reduction="sum") * temperature**2 / s.shape[0]


def kd_ce(s: Tensor, t: Tensor, labels: Tensor, temperature: float, alpha: float) -> Tensor:
    """RepDistiller's / mdistiller's KD training objective: ``alpha * KD + (1 - alpha) * cross_entropy``."""
    return alpha * kd(s, t, temperature) + (1.0 - alpha) * F.cross_entropy(s, labels)


def reverse_kl(s: Tensor, t: Tensor, temperature: float) -> Tensor:
    """``KL(q || p) * T^2`` averaged over the batch, from log-softmax (the reverse of :func:`kd`)."""
    log_p = F.log_softmax(t / temperature, dim=1)
    log_q = F.log_softmax(s / temperature, dim=1)
    return F.kl_div(log_p, log_q, reduction="sum", log_target=True) * temperature**2 / s.shape[0]


def jsd(s: Tensor, t: Tensor, temperature: float, jsd_weight: float) -> Tensor:
    """``w KL(p || m) + (1 - w) KL(q || m) * T^2`` over the batch, ``w = jsd_weight``, ``m = w p + (1 - w) q``."""
    w = jsd_weight
    p = F.softmax(t / temperature, dim=1)
    q = F.softmax(s / temperature, dim=1)
    log_m = (w * p + (1.0 - w) * q).log()
    total = w * F.kl_div(log_m, p, reduction="sum") + (1.0 - w) * F.kl_div(log_m, q, reduction="sum")
    return total * temperature**2 / s.shape[0]


def dkd(s: Tensor, t: Tensor, labels: Tensor, alpha: float, beta: float, temperature: float) -> Tensor:
    """mdistiller's DKD: target masks, binary probabilities through ``torch.log``, the target logit minus 1000."""
    gt = torch.zeros_like(s).scatter_(1, labels.unsqueeze(1), 1).bool()
    other = torch.ones_like(s).scatter_(1, labels.unsqueeze(1), 0).bool()
    ps = F.softmax(s / temperature, dim=1)
    pt = F.softmax(t / temperature, dim=1)
    bs = torch.cat([(ps * gt).sum(1, keepdim=True), (ps * other).sum(1, keepdim=True)], dim=1)
    bt = torch.cat([(pt * gt).sum(1, keepdim=True), (pt * other).sum(1, keepdim=True)], dim=1)
    tckd = F.kl_div(torch.log(bs), bt, reduction="sum") * temperature**2 / labels.shape[0]
    pt2 = F.softmax(t / temperature - 1000.0 * gt, dim=1)
    log_ps2 = F.log_softmax(s / temperature - 1000.0 * gt, dim=1)
    nckd = F.kl_div(log_ps2, pt2, reduction="sum") * temperature**2 / labels.shape[0]
    return alpha * tckd + beta * nckd


def dist(s: Tensor, t: Tensor, beta: float, gamma: float, temperature: float) -> Tensor:
    """The DIST authors' loss: Pearson correlation as the cosine of centred rows, ``1 - mean``, rows and columns."""

    def pearson(a: Tensor, b: Tensor) -> Tensor:
        a = a - a.mean(1).unsqueeze(1)
        b = b - b.mean(1).unsqueeze(1)
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + 1e-8)

    ys = F.softmax(s / temperature, dim=1)
    yt = F.softmax(t / temperature, dim=1)
    inter = 1 - pearson(ys, yt).mean()
    intra = 1 - pearson(ys.transpose(0, 1), yt.transpose(0, 1)).mean()
    return temperature**2 * (beta * inter + gamma * intra)


# ------------------------------------------------------------------------------------ features


def hint(s: Tensor, t: Tensor) -> Tensor:
    """FitNets' hint as RepDistiller's ``HintLoss``: ``nn.MSELoss()``."""
    return F.mse_loss(s, t)


def cosine_hidden(s: Tensor, t: Tensor) -> Tensor:
    """PyTorch's KD tutorial: ``CosineEmbeddingLoss`` with target +1 on the flattened representations."""
    target = torch.ones(s.shape[0], device=s.device)
    return F.cosine_embedding_loss(s.flatten(1), t.flatten(1), target)


def _attention(f: Tensor) -> Tensor:
    return F.normalize(f.pow(2).mean(1).view(f.size(0), -1))


def at(student: Sequence[Tensor], teacher: Sequence[Tensor], beta: float = 1.0) -> Tensor:
    """RepDistiller's ``Attention`` (p = 2) summed over the pairs, larger map pooled to the other's height."""
    total = torch.zeros((), device=student[0].device)
    for fs, ft in zip(student, teacher):
        hs, ht = fs.shape[2], ft.shape[2]
        if hs > ht:
            fs = F.adaptive_avg_pool2d(fs, (ht, ht))
        elif hs < ht:
            ft = F.adaptive_avg_pool2d(ft, (hs, hs))
        total = total + (_attention(fs) - _attention(ft)).pow(2).mean()
    return beta * total


def _factor(f: Tensor) -> Tensor:
    return F.normalize(f.pow(2).mean(1).view(f.size(0), -1))


def ft_repdistiller(s: Tensor, t: Tensor) -> Tensor:
    """RepDistiller's ``FactorTransfer`` (p1 = 2, p2 = 1): ``(factor(s) - factor(t)).abs().mean()``."""
    hs, ht = s.shape[2], t.shape[2]
    if hs > ht:
        s = F.adaptive_avg_pool2d(s, (ht, ht))
    elif hs < ht:
        t = F.adaptive_avg_pool2d(t, (hs, hs))
    return (_factor(s) - _factor(t)).abs().mean()


def ft_paper(s: Tensor, t: Tensor) -> Tensor:
    """Kim et al.'s equation: L1 distance of the L2-normalised flattened factors, mean over the batch."""
    fs = F.normalize(s.view(s.size(0), -1))
    ft = F.normalize(t.view(t.size(0), -1))
    return (ft - fs).abs().sum(1).mean()


def ab(s: Tensor, t: Tensor, margin: float = 1.0) -> Tensor:
    """The AB authors' ``criterion_alternative_l2`` (as in RepDistiller), divided by the batch size."""
    off = ((s > -margin) & (t <= 0)).float()
    on = ((s <= margin) & (t > 0)).float()
    loss = (s + margin) ** 2 * off + (s - margin) ** 2 * on
    return torch.abs(loss).sum() / s.shape[0]


def vid(pred_mean: Tensor, t: Tensor, variance: Tensor) -> Tensor:
    """RepDistiller's ``VIDLoss`` after its regressor: ``mean(0.5 ((mu - t)^2 / var + log var))``."""
    var = variance.view(1, -1, 1, 1)
    return torch.mean(0.5 * ((pred_mean - t) ** 2 / var + torch.log(var)))


def hcl(student: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:
    """ReviewKD's ``hcl`` (the authors' and mdistiller's): MSE plus pooled 4/2/1 pyramids with halving weights."""
    total = torch.zeros((), device=student[0].device)
    for fs, ft in zip(student, teacher):
        h = fs.shape[2]
        loss = F.mse_loss(fs, ft)
        cnt, tot = 1.0, 1.0
        for level in (4, 2, 1):
            if level >= h:
                continue
            cnt /= 2.0
            pooled_s, pooled_t = F.adaptive_avg_pool2d(fs, (level, level)), F.adaptive_avg_pool2d(ft, (level, level))
            loss = loss + F.mse_loss(pooled_s, pooled_t) * cnt
            tot += cnt
        total = total + loss / tot
    return total


def nst(s: Tensor, t: Tensor) -> Tensor:
    """RepDistiller's ``NSTLoss`` (full MMD, degree-2 polynomial kernel through broadcasting)."""
    hs, ht = s.shape[2], t.shape[2]
    if hs > ht:
        s = F.adaptive_avg_pool2d(s, (ht, ht))
    elif hs < ht:
        t = F.adaptive_avg_pool2d(t, (hs, hs))
    s = F.normalize(s.view(s.shape[0], s.shape[1], -1), dim=2)
    t = F.normalize(t.view(t.shape[0], t.shape[1], -1), dim=2)

    def poly(a: Tensor, b: Tensor) -> Tensor:
        return (a.unsqueeze(1) * b.unsqueeze(2)).sum(-1).pow(2)

    return poly(t, t).mean().detach() + poly(s, s).mean() - 2 * poly(s, t).mean()


def sp(s: Tensor, t: Tensor) -> Tensor:
    """RepDistiller's ``Similarity``: row-normalised batch Gram matrices, ``sum((G_t - G_s)^2) / B^2``."""
    b = s.shape[0]
    fs, ft = s.view(b, -1), t.view(b, -1)
    gs = F.normalize(torch.mm(fs, fs.t()))
    gt = F.normalize(torch.mm(ft, ft.t()))
    diff = gt - gs
    return (diff * diff).view(-1, 1).sum(0).squeeze(0) / (b * b)


def fsp(student: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:
    """RepDistiller's ``FSP`` summed over the consecutive pairs: mean squared difference of the flow matrices."""

    def flows(g: Sequence[Tensor]) -> list[Tensor]:
        out = []
        for bot, top in itertools.pairwise(g):
            hb, ht = bot.shape[2], top.shape[2]
            if hb > ht:
                bot = F.adaptive_avg_pool2d(bot, (ht, ht))
            elif hb < ht:
                top = F.adaptive_avg_pool2d(top, (hb, hb))
            bot = bot.unsqueeze(1).view(bot.shape[0], 1, bot.shape[1], -1)
            top = top.unsqueeze(2).view(top.shape[0], top.shape[1], 1, -1)
            out.append((bot * top).mean(-1))
        return out

    total = torch.zeros((), device=student[0].device)
    for gs, gt in zip(flows(student), flows(teacher)):
        total = total + (gs - gt).pow(2).mean()
    return total


# ------------------------------------------------------------------------------------ relations


def _pdist(e: Tensor, eps: float = 1e-12) -> Tensor:
    sq = e.pow(2).sum(dim=1)
    res = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * e @ e.t()).clamp(min=eps).sqrt()
    res = res.clone()
    res[range(len(e)), range(len(e))] = 0
    return res


def rkd(s: Tensor, t: Tensor, distance_weight: float = 25.0, angle_weight: float = 50.0) -> Tensor:
    """RepDistiller's / mdistiller's ``RKDLoss``: Gram-form distances over the mean non-zero distance,
    angles through the ``(B, B, D)`` differences, ``smooth_l1_loss`` means."""
    stu, tea = s.view(s.shape[0], -1), t.view(t.shape[0], -1)
    with torch.no_grad():
        t_d = _pdist(tea)
        t_d = t_d / t_d[t_d > 0].mean()
    d = _pdist(stu)
    d = d / d[d > 0].mean()
    loss_d = F.smooth_l1_loss(d, t_d)
    with torch.no_grad():
        td = F.normalize(tea.unsqueeze(0) - tea.unsqueeze(1), p=2, dim=2)
        t_angle = torch.bmm(td, td.transpose(1, 2)).view(-1)
    sd = F.normalize(stu.unsqueeze(0) - stu.unsqueeze(1), p=2, dim=2)
    s_angle = torch.bmm(sd, sd.transpose(1, 2)).view(-1)
    loss_a = F.smooth_l1_loss(s_angle, t_angle)
    return distance_weight * loss_d + angle_weight * loss_a


def pkt(s: Tensor, t: Tensor, eps: float = 1e-7) -> Tensor:
    """RepDistiller's ``PKT`` (the authors' code): cosine-kernel conditionals, ``mean(q log((q+eps) / (p+eps)))``."""

    def conditional(e: Tensor) -> Tensor:
        e = e / (torch.sqrt(torch.sum(e**2, dim=1, keepdim=True)) + eps)
        sim = (torch.mm(e, e.transpose(0, 1)) + 1.0) / 2.0
        return sim / torch.sum(sim, dim=1, keepdim=True)

    ps, pt = conditional(s), conditional(t)
    return torch.mean(pt * torch.log((pt + eps) / (ps + eps)))


def cc_repdistiller(s: Tensor, t: Tensor) -> Tensor:
    """RepDistiller's ``Correlation``: ``mean over i of sum(|d_i| |d_{i+1}|)``, ``d = f_s - f_t``."""
    delta = torch.abs(s - t)
    return torch.mean((delta[:-1] * delta[1:]).sum(1))


def cc_paper(s: Tensor, t: Tensor, gamma: float = 0.4, order: int = 2) -> Tensor:
    """Peng et al.'s correlation congruence: Taylor-expanded Gaussian RBF of unit embeddings, ``||.||_F^2 / B^2``."""

    def psi(f: Tensor) -> Tensor:
        f = F.normalize(f, dim=1)
        sim = f @ f.t()
        out = torch.zeros_like(sim)
        for p in range(order + 1):
            out = out + math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * sim.pow(p)
        return out

    return (psi(t) - psi(s)).pow(2).mean()


# ------------------------------------------------------------------------------------ cohorts of heads


def paired_kd(students: Tensor, teachers: Tensor, labels: Tensor, temperature: float, alpha: float) -> Tensor:
    """MHKD, pair by pair as its authors loop: ``sum_j alpha KD(s_j, t_j) + (1 - alpha) CE(s_j, y)``."""
    total = torch.zeros((), device=students.device)
    for s, t in zip(students, teachers):
        total = total + kd_ce(s, t, labels, temperature, alpha)
    return total


def self_distillation(
    exits: Tensor,
    final: Tensor,
    labels: Tensor,
    temperature: float,
    alpha: float,
    beta: float,
    exit_features: Sequence[Tensor],
    final_feature: Tensor,
) -> Tensor:
    """BYOT: ``CE(final) + sum_i [(1 - alpha) CE(exit_i) + alpha KD(final -> exit_i)] + beta sum_i MSE(f_i, f)``."""
    total = F.cross_entropy(final, labels)
    for z in exits:
        total = total + kd_ce(z, final.detach(), labels, temperature, alpha)
    for f in exit_features:
        total = total + beta * F.mse_loss(f, final_feature.detach())
    return total


def orthogonality(weight: Tensor) -> Tensor:
    """``||W W^T - I||_F^2`` over the smaller side of the reshaped weight."""
    m = weight.reshape(weight.shape[0], -1)
    if m.shape[0] > m.shape[1]:
        m = m.t()
    return (m @ m.t() - torch.eye(m.shape[0], device=m.device)).pow(2).sum()
