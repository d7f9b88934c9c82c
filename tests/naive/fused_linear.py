"""Naive textbook references for language-model distillation, written from the formulas.

``lm_kd`` materialises both logit tensors and lets autograd differentiate: the reference that
:func:`kdloss.functional.fused_linear_kd` is compared with (values and gradients, in float64), and
the ``naive`` baseline of ``benchmarks/`` (``lm_kl_div``: materialised logits + ``F.kl_div``).
``sparse_kd`` is the coarsened (top-k + tail) divergence written out term by term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def divergence_rows(log_p: Tensor, log_q: Tensor, divergence: str, beta: float) -> Tensor:
    """D(p, q) per row from log-probabilities (finite), written from the definitions."""
    p, q = log_p.exp(), log_q.exp()
    if divergence == "forward":
        return (p * (log_p - log_q)).sum(-1)
    if divergence == "reverse":
        return (q * (log_q - log_p)).sum(-1)
    if divergence == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * (p * (log_p - m.log())).sum(-1) + (1 - beta) * (q * (log_q - m.log())).sum(-1)
    if divergence == "tv":
        return 0.5 * (p - q).abs().sum(-1)
    raise ValueError(divergence)


def lm_kd(
    hs: Tensor,
    ws: Tensor,
    ht: Tensor,
    wt: Tensor,
    labels: Tensor | None = None,
    *,
    bs: Tensor | None = None,
    bt: Tensor | None = None,
    temperature: float = 1.0,
    divergence: str = "forward",
    beta: float = 0.5,
    hard_weight: float = 0.0,
    soft_weight: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "batchmean",
) -> Tensor:
    """soft_weight * T^2 * D(softmax(t/T), softmax(s/T)) + hard_weight * CE(s, y) per token, logits materialised."""
    s = hs @ ws.T + (bs if bs is not None else 0)
    t = (ht @ wt.T + (bt if bt is not None else 0)).detach()
    rows = s.shape[:-1]
    s, t = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
    log_q = F.log_softmax(s / temperature, dim=-1)
    log_p = F.log_softmax(t / temperature, dim=-1)
    per = soft_weight * temperature**2 * divergence_rows(log_p, log_q, divergence, beta)
    valid = torch.ones(per.shape, dtype=torch.bool) if labels is None else labels.reshape(-1) != ignore_index
    if hard_weight:
        assert labels is not None
        y = torch.where(valid, labels.reshape(-1), 0)
        per = per + hard_weight * F.cross_entropy(s, y, reduction="none")
    per = torch.where(valid, per, torch.zeros_like(per))
    if reduction == "none":
        return per.reshape(rows)
    if reduction == "sum":
        return per.sum()
    return per.sum() / max(int(valid.sum()), 1)


def lm_kl_div(hs: Tensor, ws: Tensor, ht: Tensor, wt: Tensor, temperature: float) -> Tensor:
    """The usual formulation: both logits materialised, log_softmax + ``F.kl_div(batchmean)`` * T^2."""
    log_q = F.log_softmax((hs @ ws.T).float() / temperature, dim=-1)
    with torch.no_grad():
        log_p = F.log_softmax((ht @ wt.T).float() / temperature, dim=-1)
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True) * temperature**2


def sparse_kd(
    student_logits: Tensor,
    teacher_logprobs: Tensor,
    teacher_indices: Tensor,
    teacher_tail: Tensor | None,
    *,
    temperature: float = 1.0,
    divergence: str = "forward",
    beta: float = 0.5,
) -> Tensor:
    """Per-token D over the k + 1 outcomes (top-k classes, the rest), as a loop over tokens (batchmean * T^2)."""
    s = student_logits.reshape(-1, student_logits.shape[-1])
    lp = teacher_logprobs.reshape(-1, teacher_logprobs.shape[-1])
    idx = teacher_indices.reshape(-1, teacher_indices.shape[-1])
    total = s.new_zeros(())
    for i in range(s.shape[0]):
        q = F.softmax(s[i] / temperature, dim=-1)
        q_top = q[idx[i]]
        if teacher_tail is None:
            p_top = F.softmax(lp[i] / temperature, dim=-1)
            p_rest = p_top.new_zeros(())
        else:
            p_top = lp[i].exp()
            p_rest = teacher_tail.reshape(-1)[i]
        rest = torch.ones_like(q, dtype=torch.bool)
        rest[idx[i]] = False
        q_rest = q[rest].sum()
        p_all = torch.cat([p_top, p_rest.reshape(1)])
        q_all = torch.cat([q_top, q_rest.reshape(1)])
        if divergence == "forward":
            keep = p_all > 0
            d = (p_all[keep] * (p_all[keep].log() - q_all[keep].log())).sum()
        elif divergence == "reverse":
            d = (q_all * (q_all.log() - p_all.log())).sum()
        elif divergence == "jsd":
            m = beta * p_all + (1 - beta) * q_all
            kp = p_all > 0
            d = beta * (p_all[kp] * (p_all[kp] / m[kp]).log()).sum() + (1 - beta) * (q_all * (q_all / m).log()).sum()
        else:
            d = 0.5 * (p_all - q_all).abs().sum()
        total = total + d
    return total / s.shape[0] * temperature**2
