"""Module form of :func:`kdloss.functional.attention_loss`."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from kdloss._validate import Reduction, check_nonnegative, check_positive, check_reduction
from kdloss.functional.attention import AttentionPool, attention_loss, check_pool

__all__ = ["AttentionLoss"]


class AttentionLoss(nn.Module):
    """Attention transfer over one or more feature pairs; see :func:`kdloss.functional.attention_loss`.

    Args:
        p: exponent of the attention map (2).
        beta: weight of the whole term. The default, 1, is the bare distance: about 1000 times
            weaker than the paper's experiments and RepDistiller's benchmark, which use
            ``beta=1000`` with this per-position mean; pass ``beta=1000.0`` to reproduce them
            (``docs/attention.md``).
        reduction: ``"none" | "mean" | "batchmean" | "sum"``.
        pool: ``"features"`` (default, RepDistiller's and mdistiller's: pool the larger feature
            map to the common size, then take its attention map) or ``"maps"`` (pool the larger
            attention energy map); matters only for pairs of different spatial sizes.

    Raises:
        TypeError, ValueError: for a bad hyper-parameter, when the module is built (the checks of
            :func:`kdloss.functional.attention_loss`); ``forward`` raises what the function raises.

    Example:
        >>> import torch
        >>> AttentionLoss(beta=1000.0)
        AttentionLoss(p=2.0, beta=1000.0, reduction='mean', pool='features')
    """

    def __init__(
        self, *, p: float = 2.0, beta: float = 1.0, reduction: Reduction = "mean", pool: AttentionPool = "features"
    ) -> None:
        super().__init__()
        self.p = check_positive("p", p)
        self.beta = check_nonnegative("beta", beta)
        self.reduction: Reduction = check_reduction(reduction)
        self.pool: AttentionPool = check_pool(pool)

    def forward(
        self, student_features: Tensor | Sequence[Tensor], teacher_features: Tensor | Sequence[Tensor]
    ) -> Tensor:
        return attention_loss(
            student_features, teacher_features, p=self.p, beta=self.beta, reduction=self.reduction, pool=self.pool
        )

    def extra_repr(self) -> str:
        return f"p={self.p}, beta={self.beta}, reduction={self.reduction!r}, pool={self.pool!r}"
