"""Shared numerics of the losses: the reduction, the compute dtype, pairing, the log floor, row validity,
and two call-free conversions (``detached``, ``in_dtype``).

A private module: the losses of :mod:`kdloss.functional` import these (the argument checks live
in :mod:`kdloss._validate`). Nothing here reads a tensor's value on the host.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from kdloss._validate import Reduction

__all__ = ["LOG_FLOOR", "compute_dtype", "detached", "has_finite_rows", "in_dtype", "pair_up", "reduce_loss"]

LOG_FLOOR = -1e30
"""Log-probabilities are floored here so that a class with probability 0 in both distributions
(a ``-inf`` logit) contributes ``0 * finite = 0`` instead of ``0 * (-inf - -inf) = NaN``, in values
and in gradients. No finite float32 log-softmax output comes near it."""


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype a loss computes in: float32 for half, bfloat16 and float32 inputs, float64 if any is float64."""
    # Plain Python on the dtypes: torch.promote_types is dispatched like an operator (host time on
    # every call). Every input here is a floating-point tensor (checked before).
    for t in tensors:
        if t.dtype == torch.float64:
            return torch.float64
    return torch.float32


def detached(t: Tensor) -> Tensor:
    """``t.detach()`` where it matters: ``t`` itself when it does not require grad (``detach`` is a
    dispatched operator, and a teacher's output usually comes from ``torch.no_grad``)."""
    return t.detach() if t.requires_grad else t


def in_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)``, without the call when ``t`` already has it."""
    return t if t.dtype == dtype else t.to(dtype)


def pair_up(
    student: Tensor | Sequence[Tensor], teacher: Tensor | Sequence[Tensor], *, one: str, many: str, context: str = ""
) -> tuple[list[Tensor], list[Tensor]]:
    """One tensor each, or two equally long, non-empty sequences of them, as two lists (loss over pairs).

    ``one`` and ``many`` name one element and several in the messages (``"feature map"``,
    ``"maps"``); ``context`` prefixes them (``"fsp_loss: "``). The elements themselves are checked by the caller.
    """
    s_list = [student] if isinstance(student, Tensor) else list(student)
    t_list = [teacher] if isinstance(teacher, Tensor) else list(teacher)
    if len(s_list) != len(t_list):
        raise ValueError(
            f"{context}student_features and teacher_features must pair up, got {len(s_list)} and {len(t_list)} {many}"
        )
    if not s_list:
        raise ValueError(f"{context}student_features must hold at least one {one}, got an empty sequence")
    return s_list, t_list


def reduce_loss(loss: Tensor, reduction: Reduction, *, rows: Tensor | int, elements_per_row: int = 1) -> Tensor:
    """Reduce a per-row loss.

    Args:
        loss: the unreduced loss, one value per row (sample or sequence position).
        reduction: see :data:`kdloss.Reduction`.
        rows: the number of rows that count (a tensor when a mask decides it, so that no host
            synchronisation is needed). ``batchmean`` divides the sum by it, ``mean`` divides
            by ``rows * elements_per_row``; an empty count gives 0, never NaN.
        elements_per_row: the number of elements that make up one row's value (the class count
            for a KL divergence), used by ``mean``.
    """
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    denom = rows * elements_per_row if reduction == "mean" else rows
    if isinstance(denom, Tensor):
        return total / denom.clamp(min=1).to(total.dtype)
    return total / max(denom, 1)


def has_finite_rows(x: Tensor) -> Tensor:
    """Rows with a logit that is not ``-inf``: one reduction (``amax``) instead of ``(x == -inf).all()``'s two.

    Same result for every input, NaN rows included (they count, and propagate NaN, as before).
    """
    if x.shape[-1] == 0:
        return torch.zeros(x.shape[:-1], dtype=torch.bool, device=x.device)
    return x.detach().amax(dim=-1) != float("-inf")
