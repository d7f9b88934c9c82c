"""Module forms of the relational functions in :mod:`kdloss.functional.relational`."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from kdloss._validate import Reduction, check_nonnegative, check_option, check_positive, check_reduction
from kdloss.functional.relational import (
    CCVariant,
    FSPVariant,
    RKDPairs,
    cc_loss,
    fsp_loss,
    nst_loss,
    pkt_loss,
    rkd_loss,
    sp_loss,
)

__all__ = ["CCLoss", "FSPLoss", "NSTLoss", "PKTLoss", "RKDLoss", "SPLoss"]


class SPLoss(nn.Module):
    """Similarity-preserving KD; see :func:`kdloss.functional.sp_loss`. No hyper-parameters.

    Example:
        >>> import torch
        >>> SPLoss()(torch.ones(4, 8), torch.ones(4, 3, 2, 2))
        tensor(0.)
    """

    def forward(
        self, student_features: Tensor | Sequence[Tensor], teacher_features: Tensor | Sequence[Tensor]
    ) -> Tensor:
        return sp_loss(student_features, teacher_features)


class CCLoss(nn.Module):
    r"""Correlation congruence; see :func:`kdloss.functional.cc_loss`.

    Args:
        gamma: the RBF kernel's :math:`\gamma > 0`.
        order: the Taylor order :math:`P \ge 0` (default 2).
        variant: ``"paper"`` or ``"repdistiller"``.

    Raises:
        TypeError, ValueError: for a bad hyper-parameter, when the module is built (the checks of
            :func:`kdloss.functional.cc_loss`); ``forward`` raises what the function raises.

    Example:
        >>> CCLoss(variant="repdistiller")
        CCLoss(gamma=0.4, order=2, variant='repdistiller')
    """

    def __init__(self, *, gamma: float = 0.4, order: int = 2, variant: CCVariant = "paper") -> None:
        super().__init__()
        self.gamma = check_positive("gamma", gamma)
        if isinstance(order, bool) or not isinstance(order, int):
            raise TypeError(f"order must be an int, got {type(order).__name__} {order!r}")
        if order < 0:
            raise ValueError(f"order must be >= 0, got {order}")
        self.order = order
        check_option("variant", variant, ("paper", "repdistiller"))
        self.variant: CCVariant = variant

    def forward(self, student_embeddings: Tensor, teacher_embeddings: Tensor) -> Tensor:
        return cc_loss(student_embeddings, teacher_embeddings, gamma=self.gamma, order=self.order, variant=self.variant)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, order={self.order}, variant={self.variant!r}"


class RKDLoss(nn.Module):
    r"""Relational KD (distance + angle); see :func:`kdloss.functional.rkd_loss`.

    Args:
        distance_weight: :math:`\lambda_D \ge 0` (25); 0 skips the distance term.
        angle_weight: :math:`\lambda_A \ge 0` (50); 0 skips the angle term.
        pairs: ``"all"`` or ``"distinct"``.

    Raises:
        TypeError, ValueError: for a bad hyper-parameter, when the module is built (the checks of
            :func:`kdloss.functional.rkd_loss`); ``forward`` raises what the function raises.

    Example:
        >>> RKDLoss()
        RKDLoss(distance_weight=25.0, angle_weight=50.0, pairs='all')
    """

    def __init__(self, *, distance_weight: float = 25.0, angle_weight: float = 50.0, pairs: RKDPairs = "all") -> None:
        super().__init__()
        self.distance_weight = check_nonnegative("distance_weight", distance_weight)
        self.angle_weight = check_nonnegative("angle_weight", angle_weight)
        check_option("pairs", pairs, ("all", "distinct"))
        self.pairs: RKDPairs = pairs

    def forward(self, student_embeddings: Tensor, teacher_embeddings: Tensor) -> Tensor:
        return rkd_loss(
            student_embeddings,
            teacher_embeddings,
            distance_weight=self.distance_weight,
            angle_weight=self.angle_weight,
            pairs=self.pairs,
        )

    def extra_repr(self) -> str:
        return f"distance_weight={self.distance_weight}, angle_weight={self.angle_weight}, pairs={self.pairs!r}"


class PKTLoss(nn.Module):
    """Probabilistic knowledge transfer; see :func:`kdloss.functional.pkt_loss`.

    Args:
        include_self: keep the :math:`j = i` terms (see :func:`kdloss.functional.pkt_loss`).
        reduction: ``"none" | "mean" | "batchmean" | "sum"``.
        eps: lower bound of the probabilities inside the log, ``>= 0``.

    Raises:
        TypeError, ValueError: for a bad hyper-parameter, when the module is built (the checks of
            :func:`kdloss.functional.pkt_loss`); ``forward`` raises what the function raises.

    Example:
        >>> PKTLoss()
        PKTLoss(include_self=True, reduction='mean', eps=1e-07)
    """

    def __init__(self, *, include_self: bool = True, reduction: Reduction = "mean", eps: float = 1e-7) -> None:
        super().__init__()
        self.include_self = bool(include_self)
        self.reduction: Reduction = check_reduction(reduction)
        self.eps = check_nonnegative("eps", eps)

    def forward(self, student_embeddings: Tensor, teacher_embeddings: Tensor) -> Tensor:
        return pkt_loss(
            student_embeddings,
            teacher_embeddings,
            include_self=self.include_self,
            reduction=self.reduction,
            eps=self.eps,
        )

    def extra_repr(self) -> str:
        return f"include_self={self.include_self}, reduction={self.reduction!r}, eps={self.eps}"


class FSPLoss(nn.Module):
    """Flow-of-solution-procedure matrices between consecutive stages; see :func:`kdloss.functional.fsp_loss`.

    Args:
        variant: ``"paper"`` or ``"repdistiller"``.
        reduction: ``"none" | "mean" | "batchmean" | "sum"``.

    Raises:
        TypeError, ValueError: for a bad hyper-parameter, when the module is built (the checks of
            :func:`kdloss.functional.fsp_loss`); ``forward`` raises what the function raises.

    Example:
        >>> FSPLoss()
        FSPLoss(variant='paper', reduction='mean')
    """

    def __init__(self, *, variant: FSPVariant = "paper", reduction: Reduction = "mean") -> None:
        super().__init__()
        check_option("variant", variant, ("paper", "repdistiller"))
        self.variant: FSPVariant = variant
        self.reduction: Reduction = check_reduction(reduction)

    def forward(self, student_features: Sequence[Tensor], teacher_features: Sequence[Tensor]) -> Tensor:
        return fsp_loss(student_features, teacher_features, variant=self.variant, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"variant={self.variant!r}, reduction={self.reduction!r}"


class NSTLoss(nn.Module):
    r"""Neuron selectivity transfer (polynomial-kernel MMD); see :func:`kdloss.functional.nst_loss`.

    Args:
        degree: the kernel's degree :math:`d \ge 1`.
        bias: the kernel's :math:`c \ge 0`.
        reduction: ``"none" | "mean" | "batchmean" | "sum"``.

    Raises:
        TypeError, ValueError: for a bad hyper-parameter, when the module is built (the checks of
            :func:`kdloss.functional.nst_loss`); ``forward`` raises what the function raises.

    Example:
        >>> NSTLoss()
        NSTLoss(degree=2, bias=0.0, reduction='mean')
    """

    def __init__(self, *, degree: int = 2, bias: float = 0.0, reduction: Reduction = "mean") -> None:
        super().__init__()
        if isinstance(degree, bool) or not isinstance(degree, int):
            raise TypeError(f"degree must be an int, got {type(degree).__name__} {degree!r}")
        if degree < 1:
            raise ValueError(f"degree must be >= 1, got {degree}")
        self.degree = degree
        self.bias = check_nonnegative("bias", bias)
        self.reduction: Reduction = check_reduction(reduction)

    def forward(
        self, student_features: Tensor | Sequence[Tensor], teacher_features: Tensor | Sequence[Tensor]
    ) -> Tensor:
        return nst_loss(
            student_features, teacher_features, degree=self.degree, bias=self.bias, reduction=self.reduction
        )

    def extra_repr(self) -> str:
        return f"degree={self.degree}, bias={self.bias}, reduction={self.reduction!r}"
