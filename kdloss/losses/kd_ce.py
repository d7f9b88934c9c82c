"""Module form of :func:`kdloss.functional.kd_ce_loss`."""

from __future__ import annotations

from torch import Tensor, nn

from kdloss._validate import Reduction, check_positive, check_reduction, check_unit_interval
from kdloss.functional.kd_ce import KD_CE_REDUCTIONS, kd_ce_loss

__all__ = ["KDCELoss"]


class KDCELoss(nn.Module):
    """``alpha * T^2 * KL + (1 - alpha) * CE`` in one call; see :func:`kdloss.functional.kd_ce_loss`.

    Holds the hyper-parameters only (validated here). Fused into one kernel on CUDA when Triton is
    installed.

    Args:
        alpha: weight of the KD term in ``[0, 1]``; ``1 - alpha`` weighs the cross-entropy.
        temperature: softening temperature ``T > 0`` of the KD term.
        reduction: ``"none" | "sum" | "batchmean"``.
        ignore_index: the label value that marks ignored rows (default -100).

    Raises:
        TypeError, ValueError: for a bad hyper-parameter, when the module is built (the checks of
            :func:`kdloss.functional.kd_ce_loss`); ``forward`` raises what the function raises.

    Example:
        >>> import torch
        >>> KDCELoss(alpha=0.9, temperature=4.0)
        KDCELoss(alpha=0.9, temperature=4.0, reduction='batchmean')
        >>> loss = KDCELoss(alpha=1.0)(torch.zeros(2, 10), torch.zeros(2, 10), torch.tensor([1, 2]))
        >>> loss
        tensor(0.)
    """

    def __init__(
        self,
        alpha: float = 0.5,
        *,
        temperature: float = 1.0,
        reduction: Reduction = "batchmean",
        ignore_index: int = -100,
    ) -> None:
        super().__init__()
        self.alpha = check_unit_interval("alpha", alpha)
        self.temperature = check_positive("temperature", temperature)
        self.reduction: Reduction = check_reduction(reduction, KD_CE_REDUCTIONS)
        self.ignore_index = ignore_index

    def forward(
        self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, *, mask: Tensor | None = None
    ) -> Tensor:
        return kd_ce_loss(
            student_logits,
            teacher_logits,
            labels,
            alpha=self.alpha,
            temperature=self.temperature,
            reduction=self.reduction,
            mask=mask,
            ignore_index=self.ignore_index,
        )

    def extra_repr(self) -> str:
        s = f"alpha={self.alpha}, temperature={self.temperature}, reduction={self.reduction!r}"
        if self.ignore_index != -100:
            s += f", ignore_index={self.ignore_index}"
        return s
