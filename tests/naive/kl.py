"""Naive textbook references, written from the papers and tutorials, to compare kdloss against.

These are deliberately plain (no masking, no validation, no numerical care beyond the source's)
and are also the baselines of ``benchmarks/``.
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


def kd_ce(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature: float, alpha: float) -> Tensor:
    """Hinton KD mixed with cross-entropy: alpha * KD * T^2 + (1 - alpha) * CE (naive form)."""
    return alpha * kd_kl_div(student_logits, teacher_logits, temperature) + (1 - alpha) * F.cross_entropy(
        student_logits, labels
    )


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


def hint_mse(student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
    """FitNets: plain MSE (mean over all elements)."""
    return F.mse_loss(student_feature, teacher_feature)


def at_map(x: Tensor) -> Tensor:
    """Zagoruyko & Komodakis: F.normalize(x.pow(2).mean(1).view(B, -1))."""
    return F.normalize(x.pow(2).mean(1).view(x.size(0), -1))


def at_loss(student_features: list[Tensor], teacher_features: list[Tensor], beta: float = 1.0) -> Tensor:
    """Sum over pairs of (at(x) - at(y)).pow(2).mean(), times beta (same spatial sizes)."""
    return beta * sum((at_map(s) - at_map(t)).pow(2).mean() for s, t in zip(student_features, teacher_features))  # type: ignore[return-value]


def cosine_hidden(student_hidden: Tensor, teacher_hidden: Tensor) -> Tensor:
    """The tutorial's hidden loss: CosineEmbeddingLoss with target +1."""
    target = torch.ones(student_hidden.shape[0], device=student_hidden.device)
    return torch.nn.CosineEmbeddingLoss()(student_hidden.flatten(1), teacher_hidden.flatten(1), target)


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


def at_loss_pooled(student_feature: Tensor, teacher_feature: Tensor, beta: float = 1.0) -> Tensor:
    """Attention transfer for one pair whose spatial sizes differ by an integer factor.

    The larger map's channel mean of x^2 is average-pooled (kernel = stride = the factor) to the
    smaller size before flattening and normalising; then as :func:`at_loss`.
    """

    def q(x: Tensor) -> Tensor:
        return x.pow(2).mean(1, keepdim=True)

    qs, qt = q(student_feature), q(teacher_feature)
    if qs.shape[-1] > qt.shape[-1]:
        qs = F.avg_pool2d(qs, qs.shape[-1] // qt.shape[-1])
    elif qt.shape[-1] > qs.shape[-1]:
        qt = F.avg_pool2d(qt, qt.shape[-1] // qs.shape[-1])
    a_s = F.normalize(qs.view(qs.size(0), -1))
    a_t = F.normalize(qt.view(qt.size(0), -1))
    return beta * (a_s - a_t).pow(2).mean()


def at_loss_repdistiller(student_feature: Tensor, teacher_feature: Tensor, beta: float = 1.0) -> Tensor:
    """RepDistiller's / mdistiller's AT for one pair of square maps, as they write it.

    Only the heights are compared: the map with the larger height is adaptive-average-pooled to
    ``(h, h)``, ``h`` the other's height, then ``(at(f_s) - at(f_t)).pow(2).mean()``.
    """
    s_h, t_h = student_feature.shape[2], teacher_feature.shape[2]
    if s_h > t_h:
        student_feature = F.adaptive_avg_pool2d(student_feature, (t_h, t_h))
    elif s_h < t_h:
        teacher_feature = F.adaptive_avg_pool2d(teacher_feature, (s_h, s_h))
    return beta * (at_map(student_feature) - at_map(teacher_feature)).pow(2).mean()


def at_loss_pool_features(student_feature: Tensor, teacher_feature: Tensor, beta: float = 1.0) -> Tensor:
    """The same rule for any sizes: both feature maps adaptive-average-pooled to (min H, min W), then AT."""
    size = (
        min(student_feature.shape[2], teacher_feature.shape[2]),
        min(student_feature.shape[3], teacher_feature.shape[3]),
    )
    fs = F.adaptive_avg_pool2d(student_feature, size)
    ft = F.adaptive_avg_pool2d(teacher_feature, size)
    return beta * (at_map(fs) - at_map(ft)).pow(2).mean()


def at_loss_pool_maps(student_feature: Tensor, teacher_feature: Tensor, beta: float = 1.0) -> Tensor:
    """AT with the energy maps pooled: Q = mean_c x^2 of each map, adaptive-average-pooled to (min H, min W)."""
    size = (
        min(student_feature.shape[2], teacher_feature.shape[2]),
        min(student_feature.shape[3], teacher_feature.shape[3]),
    )
    qs = F.adaptive_avg_pool2d(student_feature.pow(2).mean(1, keepdim=True), size)
    qt = F.adaptive_avg_pool2d(teacher_feature.pow(2).mean(1, keepdim=True), size)
    a_s = F.normalize(qs.view(qs.size(0), -1))
    a_t = F.normalize(qt.view(qt.size(0), -1))
    return beta * (a_s - a_t).pow(2).mean()
