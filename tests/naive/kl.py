"""Textbook soft-target KL references (Hinton et al., 2015; the PyTorch KD tutorial's summed form), reverse KL
and JSD, written from the papers, to compare kdloss against (also the baselines of ``benchmarks/``).

Deliberately plain: no masking, no validation, no numerical care beyond the source's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def kd_tutorial(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """The PyTorch KD tutorial's soft-target loss: sum p*(log p - log q) / batch * T^2."""
    soft_targets = F.softmax(teacher_logits / temperature, dim=-1)
    soft_prob = F.log_softmax(student_logits / temperature, dim=-1)
    return torch.sum(soft_targets * (soft_targets.log() - soft_prob)) / soft_prob.size()[0] * (temperature**2)


def kd_kl_div(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """The usual formulation: softmax + log_softmax + F.kl_div(batchmean) * T^2."""
    p = F.softmax(teacher_logits / temperature, dim=-1)
    log_q = F.log_softmax(student_logits / temperature, dim=-1)
    return F.kl_div(log_q, p, reduction="batchmean") * temperature**2


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """KL(q || p) / B * T^2 with probabilities from softmax."""
    q = F.softmax(student_logits / temperature, dim=-1)
    p = F.softmax(teacher_logits / temperature, dim=-1)
    return (q * (q.log() - p.log())).sum() / student_logits.shape[0] * temperature**2


def jsd(student_logits: Tensor, teacher_logits: Tensor, temperature: float, beta: float) -> Tensor:
    """beta * KL(p || m) + (1 - beta) * KL(q || m), m = beta p + (1 - beta) q, / B * T^2."""
    q = F.softmax(student_logits / temperature, dim=-1)
    p = F.softmax(teacher_logits / temperature, dim=-1)
    m = beta * p + (1 - beta) * q
    val = beta * (p * (p.log() - m.log())).sum() + (1 - beta) * (q * (q.log() - m.log())).sum()
    return val / student_logits.shape[0] * temperature**2


def kl_rows(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float, direction: str = "forward", beta: float = 0.5
) -> Tensor:
    """Per-row textbook divergence times T^2, shape ``logits.shape[:-1]`` (no masking, no floor).

    forward: sum_c p (log p - log q); reverse: sum_c q (log q - log p);
    jsd: beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q.
    """
    q = F.softmax(student_logits / temperature, dim=-1)
    p = F.softmax(teacher_logits / temperature, dim=-1)
    if direction == "forward":
        rows = (p * (p.log() - q.log())).sum(-1)
    elif direction == "reverse":
        rows = (q * (q.log() - p.log())).sum(-1)
    else:
        m = beta * p + (1 - beta) * q
        rows = beta * (p * (p.log() - m.log())).sum(-1) + (1 - beta) * (q * (q.log() - m.log())).sum(-1)
    return rows * temperature**2
