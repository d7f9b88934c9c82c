"""Module forms of :mod:`kdloss.functional.feature` (VID, AB, FT, ReviewKD's HCL).

These modules hold hyper-parameters only. The methods' trainable parts are separate modules in
:mod:`kdloss.parts.feature` that the user owns on the student side.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from kdloss._validate import Reduction, check_positive, check_reduction
from kdloss.functional.feature import FTVariant, ab_loss, ft_loss, hcl_loss, vid_loss

__all__ = ["ABLoss", "FTLoss", "HCLLoss", "VIDLoss"]


class VIDLoss(nn.Module):
    """VID's Gaussian NLL; see :func:`kdloss.functional.vid_loss`.

    ``forward(pred_mean, teacher_features, variance)`` where ``(pred_mean, variance)`` come from a
    :class:`kdloss.VIDRegressor` owned by the student side.

    Args:
        reduction: ``"none" | "mean" | "batchmean" | "sum"``.

    Raises:
        TypeError, ValueError: for a bad hyper-parameter, when the module is built (the checks of
            :func:`kdloss.functional.vid_loss`); ``forward`` raises what the function raises.

    Example:
        >>> import torch
        >>> from kdloss.parts.feature import VIDRegressor
        >>> reg, loss = VIDRegressor(8, 16, 4), VIDLoss()
        >>> loss
        VIDLoss(reduction='mean')
        >>> mean, var = reg(torch.randn(2, 8, 3, 3))
        >>> loss(mean, torch.randn(2, 4, 3, 3), var).shape
        torch.Size([])
    """

    def __init__(self, *, reduction: Reduction = "mean") -> None:
        super().__init__()
        self.reduction: Reduction = check_reduction(reduction)

    def forward(self, pred_mean: Tensor, teacher_features: Tensor, variance: Tensor) -> Tensor:
        return vid_loss(pred_mean, teacher_features, variance, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


class ABLoss(nn.Module):
    r"""Activation-boundary squared hinge; see :func:`kdloss.functional.ab_loss`.

    The student's pre-activation goes through a :class:`kdloss.ABConnector` first.

    Args:
        margin: :math:`\mu > 0` (1 in the paper).
        reduction: ``"none" | "mean" | "batchmean" | "sum"``.

    Raises:
        TypeError, ValueError: for a bad hyper-parameter, when the module is built (the checks of
            :func:`kdloss.functional.ab_loss`); ``forward`` raises what the function raises.

    Example:
        >>> ABLoss(margin=1.0)
        ABLoss(margin=1.0, reduction='batchmean')
    """

    def __init__(self, *, margin: float = 1.0, reduction: Reduction = "batchmean") -> None:
        super().__init__()
        self.margin = check_positive("margin", margin)
        self.reduction: Reduction = check_reduction(reduction)

    def forward(self, student_preact: Tensor, teacher_preact: Tensor) -> Tensor:
        return ab_loss(student_preact, teacher_preact, margin=self.margin, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, reduction={self.reduction!r}"


class FTLoss(nn.Module):
    """Factor transfer's distance between normalised factors; see :func:`kdloss.functional.ft_loss`.

    Factors come from :class:`kdloss.FTTranslator` (student) and
    :class:`kdloss.FTParaphraser` (teacher). RepDistiller's ``FactorTransfer``
    is ``FTLoss(variant="repdistiller", reduction="mean")``.

    Args:
        p: 1 (paper, RepDistiller) or 2.
        reduction: ``"none" | "mean" | "batchmean" | "sum"``.
        variant: ``"paper"`` (default: the whole factor normalised) or ``"repdistiller"`` (the
            normalised channel mean of ``|F|^factor_p``, a length ``H * W`` map).
        factor_p: the channel exponent of the RepDistiller variant (``None``: 2); must stay
            ``None`` with ``variant="paper"``.

    Raises:
        TypeError, ValueError: for a bad hyper-parameter, when the module is built (the checks of
            :func:`kdloss.functional.ft_loss`); ``forward`` raises what the function raises.

    Example:
        >>> FTLoss()
        FTLoss(p=1, reduction='batchmean', variant='paper')
        >>> FTLoss(variant="repdistiller", reduction="mean")
        FTLoss(p=1, reduction='mean', variant='repdistiller', factor_p=2.0)
    """

    def __init__(
        self,
        *,
        p: int = 1,
        reduction: Reduction = "batchmean",
        variant: FTVariant = "paper",
        factor_p: float | None = None,
    ) -> None:
        super().__init__()
        if p not in (1, 2) or isinstance(p, bool):
            raise ValueError(f"p must be 1 or 2, got {p!r}")
        self.p = p
        self.reduction: Reduction = check_reduction(reduction)
        if variant not in ("paper", "repdistiller"):
            raise ValueError(f"variant must be one of 'paper', 'repdistiller', got {variant!r}")
        self.variant: FTVariant = variant
        if variant == "paper" and factor_p is not None:
            raise ValueError(
                f"factor_p is the channel exponent of variant='repdistiller'; the paper variant has none, "
                f"got factor_p={factor_p!r}"
            )
        self.factor_p: float | None = (
            None if variant == "paper" else (2.0 if factor_p is None else check_positive("factor_p", factor_p))
        )

    def forward(self, student_factor: Tensor, teacher_factor: Tensor) -> Tensor:
        return ft_loss(
            student_factor,
            teacher_factor,
            p=self.p,
            reduction=self.reduction,
            variant=self.variant,
            factor_p=self.factor_p,
        )

    def extra_repr(self) -> str:
        s = f"p={self.p}, reduction={self.reduction!r}, variant={self.variant!r}"
        return s if self.factor_p is None else f"{s}, factor_p={self.factor_p}"


class HCLLoss(nn.Module):
    """ReviewKD's hierarchical context loss; see :func:`kdloss.functional.hcl_loss`.

    The student's maps go through a :class:`kdloss.ReviewKDFusion` first.

    Args:
        levels: pooled sizes, in the order they are weighted (the authors': 4, 2, 1).

    Raises:
        TypeError, ValueError: for a bad hyper-parameter, when the module is built (the checks of
            :func:`kdloss.functional.hcl_loss`); ``forward`` raises what the function raises.

    Example:
        >>> HCLLoss()
        HCLLoss(levels=(4, 2, 1))
    """

    def __init__(self, *, levels: Sequence[int] = (4, 2, 1)) -> None:
        super().__init__()
        levels = tuple(levels)
        for level in levels:
            if isinstance(level, bool) or not isinstance(level, int) or level < 1:
                raise ValueError(f"levels must be integers >= 1, got {levels!r}")
        self.levels = levels

    def forward(
        self, student_features: Tensor | Sequence[Tensor], teacher_features: Tensor | Sequence[Tensor]
    ) -> Tensor:
        return hcl_loss(student_features, teacher_features, levels=self.levels)

    def extra_repr(self) -> str:
        return f"levels={self.levels}"
