"""Naive references for the cohort losses: explicit Python loops over heads, one KD call each.

Deliberately plain: one :func:`kdloss.functional.soft_kl` (or textbook ``F.kl_div``) call and
one ``F.cross_entropy`` per teacher or head, exactly as the DIH / MHKD / BYOT papers write
their sums. They are the ground truth of ``tests/test_cohort.py`` and the baselines of
``benchmarks/test_bench_cohort.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kdloss.functional import soft_kl


def cohort_loop(
    student: Tensor,
    teachers: Sequence[Tensor],
    labels: Tensor,
    temperature: float,
    alpha: float,
    weights: Sequence[float] | None = None,
    form: str = "authors",
) -> Tensor:
    """sum_j w_j [alpha * soft_kl(s, t_j) + (1 - alpha) * CE(s, y)] (authors) or the normalised form."""
    w = [1.0] * len(teachers) if weights is None else list(weights)
    total = torch.zeros((), dtype=torch.promote_types(student.dtype, torch.float32))
    if form == "authors":
        for wj, t in zip(w, teachers):
            total = total + wj * (
                alpha * soft_kl(student, t, temperature=temperature) + (1 - alpha) * F.cross_entropy(student, labels)
            )
        return total
    for wj, t in zip(w, teachers):
        total = total + wj * soft_kl(student, t, temperature=temperature)
    return alpha * total / sum(w) + (1 - alpha) * F.cross_entropy(student, labels)


def cohort_kl_div(
    student: Tensor, teachers: Sequence[Tensor], labels: Tensor, temperature: float, alpha: float
) -> Tensor:
    """The DIH authors' form with the textbook F.kl_div(batchmean) * T^2 (one log-softmax per teacher)."""
    total = torch.zeros((), dtype=torch.promote_types(student.dtype, torch.float32))
    for t in teachers:
        log_q = F.log_softmax(student / temperature, dim=-1)
        p = F.softmax(t.detach() / temperature, dim=-1)
        kd = F.kl_div(log_q, p, reduction="batchmean") * temperature**2
        total = total + alpha * kd + (1 - alpha) * F.cross_entropy(student, labels)
    return total


def paired_loop(
    students: Sequence[Tensor], teachers: Sequence[Tensor], labels: Tensor, temperature: float, alpha: float
) -> Tensor:
    """MHKD: sum_j [alpha * soft_kl(s_j, t_j) + (1 - alpha) * CE(s_j, y)]."""
    total = torch.zeros((), dtype=torch.promote_types(students[0].dtype, torch.float32))
    for s, t in zip(students, teachers):
        total = total + alpha * soft_kl(s, t, temperature=temperature) + (1 - alpha) * F.cross_entropy(s, labels)
    return total


def self_distillation_loop(
    exits: Sequence[Tensor],
    final: Tensor,
    labels: Tensor,
    temperature: float,
    alpha: float,
    beta: float,
    exit_features: Sequence[Tensor] | None = None,
    final_feature: Tensor | None = None,
) -> Tensor:
    """BYOT: CE(final) + sum_i [(1 - alpha) CE(exit_i) + alpha KD(final -> exit_i)] + beta sum_i MSE(f_i, f_final)."""
    total = F.cross_entropy(final, labels)
    for z in exits:
        total = (
            total
            + (1 - alpha) * F.cross_entropy(z, labels)
            + alpha * soft_kl(z, final.detach(), temperature=temperature)
        )
    if exit_features is not None and final_feature is not None:
        for f in exit_features:
            total = total + beta * F.mse_loss(f, final_feature.detach())
    return total


def orthogonality(weight: Tensor) -> Tensor:
    """||W W^T - I||_F^2 over the smaller side, written out with a Python double loop over rows."""
    m = weight.reshape(weight.shape[0], -1)
    if m.shape[0] > m.shape[1]:
        m = m.t()
    total = torch.zeros((), dtype=m.dtype)
    for i in range(m.shape[0]):
        for j in range(m.shape[0]):
            total = total + (torch.dot(m[i], m[j]) - (1.0 if i == j else 0.0)) ** 2
    return total


def orthogonality_authors(weight: Tensor) -> Tensor:
    """The DIH authors' TOFD penalty: ||W W^T - I||_F + ||W^T W - I||_F, unsquared, as explicit sums."""
    m = weight.reshape(weight.shape[0], -1)
    total = torch.zeros((), dtype=m.dtype)
    for gram in (m @ m.t(), m.t() @ m):
        n = gram.shape[0]
        sq = sum((gram[i, j] - (1.0 if i == j else 0.0)) ** 2 for i in range(n) for j in range(n))
        total = total + torch.sqrt(sq)  # type: ignore[arg-type]
    return total


def tofd_authors(
    students: Sequence[Tensor],
    teachers: Sequence[Tensor],
    labels: Tensor,
    student_features: Sequence[Tensor],
    teacher_features: Sequence[Tensor],
    adapters: Sequence[Tensor],
    epoch: int,
    t: float = 3.0,
    feature_weight: float = 0.05,
    orth_weight: float = 0.03,
) -> Tensor:
    """The DIH authors' TOFD step, term by term: per pair, soft CE at T = 1 + t/250 (epoch + 1) (no T^2,
    batch mean) + CE + feature_weight * ||f_s A^T - f_t|| (the whole batch, unsquared); plus
    orth_weight * (||A A^T - I|| + ||A^T A - I||) per adapter A."""
    temperature = 1 + (t / 250) * float(1 + epoch)
    total = torch.zeros((), dtype=students[0].dtype)
    for s, tl, fs, ft, a in zip(students, teachers, student_features, teacher_features, adapters):
        mapped = fs @ a.t()
        total = total + feature_weight * torch.sqrt(((mapped - ft.detach()) ** 2).sum())
        total = total + F.cross_entropy(s, labels)
        log_q = F.log_softmax(s / temperature, dim=1)
        p = F.softmax(tl.detach() / temperature, dim=1)
        total = total - (log_q * p).sum(dim=1).mean()
    for a in adapters:
        total = total + orth_weight * orthogonality_authors(a)
    return total


def kd_loss_dih(student: Tensor, teacher: Tensor, labels: Tensor, alpha: float, temperature: float) -> Tensor:
    """The DIH authors' kd_loss: KLDivLoss(batchmean)(log q, p) * alpha * T^2 + CE * (1 - alpha); p not detached."""
    kl = F.kl_div(
        F.log_softmax(student / temperature, dim=1), F.softmax(teacher / temperature, dim=1), reduction="batchmean"
    )
    return kl * (alpha * temperature * temperature) + F.cross_entropy(student, labels) * (1.0 - alpha)


def dih_per_head_alphas(
    student: Tensor, teachers: Sequence[Tensor], labels: Tensor, alphas: Sequence[float], temperature: float
) -> Tensor:
    """The DIH authors' cohort loss with one alpha per teacher: heads with alpha 0 are skipped entirely."""
    total = torch.zeros((), dtype=student.dtype)
    for t, a in zip(teachers, alphas):
        if a != 0.0:
            total = total + kd_loss_dih(student, t.detach(), labels, a, temperature)
    return total


def mhkd_authors(
    students: Sequence[Tensor],
    teachers: Sequence[Tensor],
    labels: Tensor,
    alpha: float,
    temperature: float,
    head_weight: float = 0.5,
) -> Tensor:
    """The DIH authors' MHKD step: pair 0 is the final classifiers (weight 1, teacher's fc frozen, no CE on
    it); each intermediate pair j adds CE(teacher head j) + head_weight * kd_loss(s_j, t_j) with the teacher
    head NOT detached (the teacher's heads train inside the same loss)."""
    total = kd_loss_dih(students[0], teachers[0], labels, alpha, temperature)
    for s, t in zip(students[1:], teachers[1:]):
        total = total + F.cross_entropy(t, labels) + head_weight * kd_loss_dih(s, t, labels, alpha, temperature)
    return total
