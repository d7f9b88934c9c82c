"""Module forms of :func:`kdloss.functional.dkd_loss` and :func:`kdloss.functional.dist_loss`."""

from __future__ import annotations

from torch import Tensor, nn

from kdloss._validate import Reduction, check_nonnegative, check_positive, check_reduction
from kdloss.functional.logit import dist_loss, dkd_loss

__all__ = ["DISTLoss", "DKDLoss"]


class DKDLoss(nn.Module):
    """Decoupled KD (TCKD + NCKD); see :func:`kdloss.functional.dkd_loss` for the formula.

    Holds the hyper-parameters only. ``forward(student_logits, teacher_logits, labels, epoch=None)``;
    ``epoch`` is needed only when ``warmup_epochs > 0``.

    Args:
        alpha: weight of TCKD (1.0 in the paper).
        beta: weight of NCKD (8.0 for most CIFAR-100 teacher-student pairs in mdistiller).
        temperature: softening temperature ``T > 0`` (4 on CIFAR-100).
        reduction: ``"none" | "mean" | "batchmean" | "sum"``.
        warmup_epochs: linear warm-up length (mdistiller: 20); 0 (default) disables it.

    Raises:
        TypeError, ValueError: for a bad hyper-parameter, when the module is built (the checks of
            :func:`kdloss.functional.dkd_loss`); ``forward`` raises what the function raises.

    Example:
        >>> import torch
        >>> DKDLoss(beta=8.0, temperature=4.0, warmup_epochs=20)
        DKDLoss(alpha=1.0, beta=8.0, temperature=4.0, reduction='batchmean', warmup_epochs=20.0)
        >>> DKDLoss()(torch.zeros(2, 10), torch.zeros(2, 10), torch.tensor([1, 2]))
        tensor(0.)
    """

    def __init__(
        self,
        *,
        alpha: float = 1.0,
        beta: float = 8.0,
        temperature: float = 4.0,
        reduction: Reduction = "batchmean",
        warmup_epochs: float = 0.0,
    ) -> None:
        super().__init__()
        self.alpha = check_nonnegative("alpha", alpha)
        self.beta = check_nonnegative("beta", beta)
        self.temperature = check_positive("temperature", temperature)
        self.reduction: Reduction = check_reduction(reduction)
        self.warmup_epochs = check_nonnegative("warmup_epochs", warmup_epochs)

    def forward(
        self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, *, epoch: float | None = None
    ) -> Tensor:
        return dkd_loss(
            student_logits,
            teacher_logits,
            labels,
            alpha=self.alpha,
            beta=self.beta,
            temperature=self.temperature,
            reduction=self.reduction,
            epoch=epoch,
            warmup_epochs=self.warmup_epochs,
        )

    def extra_repr(self) -> str:
        s = f"alpha={self.alpha}, beta={self.beta}, temperature={self.temperature}, reduction={self.reduction!r}"
        if self.warmup_epochs:
            s += f", warmup_epochs={self.warmup_epochs}"
        return s


class DISTLoss(nn.Module):
    """DIST's inter- and intra-class Pearson relations; see :func:`kdloss.functional.dist_loss`.

    Args:
        beta: weight of the inter-class term (1 in the paper).
        gamma: weight of the intra-class term (1 in the paper).
        temperature: ``T > 0`` (1 in the paper's ImageNet setting; CIFAR recipes use larger ``T``).
        eps: added to the correlation's denominator, ``>= 0``.

    Raises:
        TypeError, ValueError: for a bad hyper-parameter, when the module is built (the checks of
            :func:`kdloss.functional.dist_loss`); ``forward`` raises what the function raises.

    Example:
        >>> import torch
        >>> DISTLoss(beta=2.0, gamma=2.0, temperature=4.0)
        DISTLoss(beta=2.0, gamma=2.0, temperature=4.0, eps=1e-08)
    """

    def __init__(self, *, beta: float = 1.0, gamma: float = 1.0, temperature: float = 1.0, eps: float = 1e-8) -> None:
        super().__init__()
        self.beta = check_nonnegative("beta", beta)
        self.gamma = check_nonnegative("gamma", gamma)
        self.temperature = check_positive("temperature", temperature)
        self.eps = check_nonnegative("eps", eps)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        return dist_loss(
            student_logits, teacher_logits, beta=self.beta, gamma=self.gamma, temperature=self.temperature, eps=self.eps
        )

    def extra_repr(self) -> str:
        return f"beta={self.beta}, gamma={self.gamma}, temperature={self.temperature}, eps={self.eps}"
