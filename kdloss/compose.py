"""Weighted sums of loss terms that return the total and every named part, detached, for logging."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import NamedTuple

import torch
from torch import Tensor

from kdloss._validate import ShapeError, check_same_device

__all__ = ["LossParts", "WeightedSum", "weighted_sum"]


class LossParts(NamedTuple):
    """The result of a weighted sum.

    Attributes:
        total: the weighted sum, with its graph: call ``total.backward()``.
        parts: each term's unweighted value, detached, plus ``"total"`` (detached), for logging.

    Example:
        >>> import torch
        >>> total, parts = LossParts(torch.tensor(1.5), {"kd": torch.tensor(1.5), "total": torch.tensor(1.5)})
        >>> float(total), sorted(parts)
        (1.5, ['kd', 'total'])
    """

    total: Tensor
    parts: dict[str, Tensor]


def _check_weight(name: str, w: float) -> float:
    if isinstance(w, bool) or not isinstance(w, (int, float)):
        raise TypeError(f"weight of {name!r} must be a real number (int or float), got {type(w).__name__} {w!r}")
    if not -math.inf < w < math.inf:  # comparisons only: traceable under torch.compile; NaN fails
        raise ValueError(f"weight of {name!r} must be a finite number, got {w!r}")
    return float(w)


def _check_names(names: Iterable[str]) -> None:
    for name in names:
        if not isinstance(name, str) or not name:
            raise ValueError(f"loss names must be non-empty strings, got {name!r}")
        if name == "total":
            raise ValueError("'total' is reserved for the weighted sum in the parts dict; rename that term")


def weighted_sum(terms: Mapping[str, Tensor], weights: Mapping[str, float] | None = None) -> LossParts:
    r"""Add loss terms with weights and keep every named part for logging.

    .. math::

        \mathcal{L} = \sum_k w_k \, \mathcal{L}_k

    The weights are plain numbers; every term must be a 0-d tensor, all on one device. The
    parts are the *unweighted* terms (what each loss measures), detached, and ``"total"``.

    Args:
        terms: named scalar losses, e.g. ``{"kd": kd, "ce": ce, "hint": hint}``.
        weights: a weight per name (every name of ``terms``, no other); all 1 when omitted.

    Returns:
        :class:`LossParts` ``(total, parts)``.

    Raises:
        ValueError: for an empty ``terms``, names that differ between ``terms`` and ``weights``,
            a term named ``"total"``, a non-finite weight, or terms on different devices.
        TypeError: for a weight that is not a number or a term that is not a tensor.
        ShapeError: for a term that is not a scalar (0-d) tensor.

    Example:
        >>> import torch
        >>> total, parts = weighted_sum(
        ...     {"kd": torch.tensor(2.0), "ce": torch.tensor(1.0)}, {"kd": 0.9, "ce": 0.1}
        ... )
        >>> round(total.item(), 4), sorted(parts)
        (1.9, ['ce', 'kd', 'total'])
    """
    if not terms:
        raise ValueError("terms must hold at least one named loss, got none")
    _check_names(terms)
    if weights is None:
        weights = dict.fromkeys(terms, 1.0)
    if set(weights) != set(terms):
        missing, extra = sorted(set(weights) - set(terms)), sorted(set(terms) - set(weights))
        raise ValueError(
            f"terms and weights must name the same losses; missing terms (weighted but not given): {missing}, "
            f"unweighted terms (given but no weight): {extra}"
        )
    contributions: list[Tensor] = []
    parts: dict[str, Tensor] = {}
    for name, value in terms.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"term {name!r} must be a scalar torch.Tensor, got {type(value).__name__}")
        if value.ndim != 0:
            raise ShapeError(
                f"term {name!r} must be a scalar (0-d) tensor: reduce it first, got shape {tuple(value.shape)}"
            )
        contributions.append(_check_weight(name, weights[name]) * value)
        parts[name] = value.detach()
    check_same_device(**{str(k): v for k, v in terms.items()})
    total = contributions[0]
    for c in contributions[1:]:
        total = total + c
    parts["total"] = total.detach()
    return LossParts(total, parts)


class WeightedSum(torch.nn.Module):
    """Fixed weights, named once: ``WeightedSum(kd=0.9, ce=0.1, hint=0.5)(kd=..., ce=..., hint=...)``.

    Stateless apart from the weights (plain floats, not buffers). :meth:`forward` is one call of
    :func:`weighted_sum`; calling it with a name it was not built with, or without one of its
    names, is an error.

    Args:
        weights: one keyword per term, its weight (a finite number; ``"total"`` is reserved).

    Raises:
        ValueError: for no weights, a non-finite weight or the name ``"total"``.
        TypeError: for a weight that is not a number.

    Example:
        >>> import torch
        >>> objective = WeightedSum(kd=0.9, ce=0.1)
        >>> out = objective(kd=torch.tensor(1.0), ce=torch.tensor(3.0))
        >>> round(out.total.item(), 4), round(out.parts["ce"].item(), 4)
        (1.2, 3.0)
    """

    def __init__(self, **weights: float) -> None:
        super().__init__()
        if not weights:
            raise ValueError("WeightedSum needs at least one named weight, e.g. WeightedSum(kd=0.9, ce=0.1)")
        _check_names(weights)
        self.weights = {k: _check_weight(k, w) for k, w in weights.items()}

    def forward(self, **terms: Tensor) -> LossParts:
        return weighted_sum(terms, self.weights)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={w}" for k, w in self.weights.items())
