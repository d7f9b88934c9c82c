"""The textbook distillation objective: soft-target KL times T^2 plus hard-label cross-entropy."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from tests.naive.kl import kd_kl_div


def kd_ce(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature: float, alpha: float) -> Tensor:
    """Hinton KD mixed with cross-entropy: alpha * KD * T^2 + (1 - alpha) * CE (naive form)."""
    return alpha * kd_kl_div(student_logits, teacher_logits, temperature) + (1 - alpha) * F.cross_entropy(
        student_logits, labels
    )
