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
