"""Stateless ``nn.Module`` wrappers: each ``forward`` is one call of a :mod:`kdloss.functional` function."""

from kdloss.losses.attention import AttentionLoss
from kdloss.losses.cohort import CohortLoss, MultiHeadKDLoss, SelfDistillationLoss, TOFDLoss
from kdloss.losses.hint import CosineHiddenLoss, HintLoss
from kdloss.losses.kl import KDLoss

__all__ = [
    "AttentionLoss",
    "CohortLoss",
    "CosineHiddenLoss",
    "HintLoss",
    "KDLoss",
    "MultiHeadKDLoss",
    "SelfDistillationLoss",
    "TOFDLoss",
]
