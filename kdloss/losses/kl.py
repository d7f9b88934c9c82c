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
    renamed_argument,
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
        jsd_weight: the teacher's weight in the JSD mixture, in ``(0, 1)``; only with
            ``direction="jsd"`` (default 0.5 there), an error otherwise.
        ignore_index: the label value that marks ignored rows (default -100, as in
            :func:`torch.nn.functional.cross_entropy`).
        beta: the former name of ``jsd_weight`` (deprecated: a ``FutureWarning``; the attribute
            ``beta`` still reads ``jsd_weight``).

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
        jsd_weight: float | None = None,
        ignore_index: int = -100,
        beta: float | None = None,
    ) -> None:
        super().__init__()
        self.temperature = check_positive("temperature", temperature)
        self.reduction: Reduction = check_reduction(reduction)
        check_option("direction", direction, get_args(Direction))
        jsd_weight = renamed_argument("KDLoss", "jsd_weight", jsd_weight, "beta", beta)
        if jsd_weight is not None:
            if direction != "jsd":
                raise ValueError(
                    f"jsd_weight is the JSD mixture weight and needs direction='jsd', got direction={direction!r}"
                )
            check_unit_interval("jsd_weight", jsd_weight, open_ends=True)
        self.direction: Direction = direction
        self.jsd_weight = jsd_weight
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
            jsd_weight=self.jsd_weight,
            mask=mask,
            labels=labels,
            ignore_index=self.ignore_index,
        )

    def extra_repr(self) -> str:
        s = f"temperature={self.temperature}, reduction={self.reduction!r}, direction={self.direction!r}"
        if self.jsd_weight is not None:
            s += f", jsd_weight={self.jsd_weight}"
        if self.ignore_index != -100:
            s += f", ignore_index={self.ignore_index}"
        return s

    @property
    def beta(self) -> float | None:
        """The former name of :attr:`jsd_weight` (read-only)."""
        return self.jsd_weight
