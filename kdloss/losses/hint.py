"""Module forms of :func:`kdloss.functional.hint_loss` and :func:`kdloss.functional.cosine_hidden_loss`."""

from __future__ import annotations

from torch import Tensor, nn

from kdloss._validate import Reduction, check_positive, check_reduction
from kdloss.functional.hint import cosine_hidden_loss, hint_loss

__all__ = ["CosineHiddenLoss", "HintLoss"]


class HintLoss(nn.Module):
    """FitNets hint loss; see :func:`kdloss.functional.hint_loss`.

    Stateless: the adapter is a separate, trainable module on the student side
    (:class:`kdloss.ConvAdapter`, :func:`kdloss.adapter_for`).

    Args:
        reduction: ``"none" | "mean" | "batchmean" | "sum"``.

    Raises:
        TypeError, ValueError: for a bad hyper-parameter, when the module is built (the checks of
            :func:`kdloss.functional.hint_loss`); ``forward`` raises what the function raises.

    Example:
        >>> import torch
        >>> HintLoss()(torch.zeros(2, 8), torch.ones(2, 8))
        tensor(1.)
    """

    def __init__(self, *, reduction: Reduction = "mean") -> None:
        super().__init__()
        self.reduction: Reduction = check_reduction(reduction)

    def forward(self, student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
        return hint_loss(student_feature, teacher_feature, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


class CosineHiddenLoss(nn.Module):
    """``1 - cos`` between flattened representations; see :func:`kdloss.functional.cosine_hidden_loss`.

    Args:
        reduction: ``"none" | "mean" | "batchmean" | "sum"``.
        eps: ``None`` (default): exactly :class:`torch.nn.CosineEmbeddingLoss` (``1e-12`` added
            to each squared norm); or a lower bound > 0 of each norm, as in
            :func:`torch.nn.functional.cosine_similarity`. An all-zero representation gives a loss
            of 1 either way, with a gradient of size ~1e6 (``None``) or ~1/eps.

    Raises:
        TypeError, ValueError: for a bad hyper-parameter, when the module is built (the checks of
            :func:`kdloss.functional.cosine_hidden_loss`); ``forward`` raises what the function raises.

    Example:
        >>> import torch
        >>> CosineHiddenLoss()(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 3.0]]))
        tensor(1.)
    """

    def __init__(self, *, reduction: Reduction = "mean", eps: float | None = None) -> None:
        super().__init__()
        self.reduction: Reduction = check_reduction(reduction)
        self.eps = None if eps is None else check_positive("eps", eps)

    def forward(self, student_hidden: Tensor, teacher_hidden: Tensor) -> Tensor:
        return cosine_hidden_loss(student_hidden, teacher_hidden, reduction=self.reduction, eps=self.eps)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, eps={self.eps}"
