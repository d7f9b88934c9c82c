"""Module form of :func:`kdloss.functional.soft_kl`."""

from __future__ import annotations

from typing import get_args

from torch import Tensor, nn

from kdloss._validate import (
    Reduction,
    check_int,
    check_option,
    check_positive,
    check_reduction,
    check_unit_interval,
)
from kdloss.functional.kl import Direction, soft_kl

__all__ = ["KDLoss"]


class KDLoss(nn.Module):
    """Hinton's soft-target KD loss; see :func:`kdloss.functional.soft_kl` for the formula.

    Holds the hyper-parameters only (validated here, so a bad configuration fails when built).

    Args:
        temperature: softening temperature ``T > 0``.
        reduction: ``"none" | "mean" | "batchmean" | "sum"``.
        direction: ``"forward"`` (default), ``"reverse"`` or ``"jsd"``.
        beta: the teacher's weight in the JSD mixture, in ``(0, 1)``; only with
            ``direction="jsd"`` (default 0.5 there), an error otherwise.
        ignore_index: the label value that marks ignored rows (default -100, as in
            :func:`torch.nn.functional.cross_entropy`).

    Raises:
        TypeError, ValueError: for a bad hyper-parameter, when the module is built (the checks of
            :func:`kdloss.functional.soft_kl`); ``forward`` raises what the function raises.

    Example:
        >>> import torch
        >>> KDLoss(temperature=4.0)
        KDLoss(temperature=4.0, reduction='batchmean', direction='forward')
        >>> KDLoss(temperature=4.0)(torch.zeros(2, 10), torch.zeros(2, 10))
        tensor(0.)
    """

    def __init__(
        self,
        temperature: float = 1.0,
        *,
        reduction: Reduction = "batchmean",
        direction: Direction = "forward",
        beta: float | None = None,
        ignore_index: int = -100,
    ) -> None:
        super().__init__()
        self.temperature = check_positive("temperature", temperature)
        self.reduction: Reduction = check_reduction(reduction)
        check_option("direction", direction, get_args(Direction))
        if beta is not None:
            if direction != "jsd":
                raise ValueError(
                    f"beta is the JSD mixture weight and needs direction='jsd', got direction={direction!r}"
                )
            check_unit_interval("beta", beta, open_ends=True)
        self.direction: Direction = direction
        self.beta = beta
        self.ignore_index = check_int("ignore_index", ignore_index)

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        *,
        mask: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> Tensor:
        return soft_kl(
            student_logits,
            teacher_logits,
            temperature=self.temperature,
            reduction=self.reduction,
            direction=self.direction,
            beta=self.beta,
            mask=mask,
            labels=labels,
            ignore_index=self.ignore_index,
        )

    def extra_repr(self) -> str:
        s = f"temperature={self.temperature}, reduction={self.reduction!r}, direction={self.direction!r}"
        if self.beta is not None:
            s += f", beta={self.beta}"
        if self.ignore_index != -100:
            s += f", ignore_index={self.ignore_index}"
        return s
