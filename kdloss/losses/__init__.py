"""Stateless ``nn.Module`` wrappers: each ``forward`` is one call of a :mod:`kdloss.functional` function."""

from kdloss.losses.attention import AttentionLoss
from kdloss.losses.cohort import CohortLoss, MultiHeadKDLoss, SelfDistillationLoss, TOFDAuthorsLoss, TOFDLoss
from kdloss.losses.contrastive import CRDEmbed, CRDLoss
from kdloss.losses.feature import ABLoss, FTLoss, HCLLoss, VIDLoss
from kdloss.losses.fused_linear import FusedLinearKDLoss, SparseKDLoss
from kdloss.losses.hint import CosineHiddenLoss, HintLoss
from kdloss.losses.kd_ce import KDCELoss
from kdloss.losses.kl import KDLoss
from kdloss.losses.logit import DISTLoss, DKDLoss
from kdloss.losses.relational import CCLoss, FSPLoss, NSTLoss, PKTLoss, RKDLoss, SPLoss

__all__ = [
    "ABLoss",
    "AttentionLoss",
    "CCLoss",
    "CRDEmbed",
    "CRDLoss",
    "CohortLoss",
    "CosineHiddenLoss",
    "DISTLoss",
    "DKDLoss",
    "FSPLoss",
    "FTLoss",
    "FusedLinearKDLoss",
    "HCLLoss",
    "HintLoss",
    "KDCELoss",
    "KDLoss",
    "MultiHeadKDLoss",
    "NSTLoss",
    "PKTLoss",
    "RKDLoss",
    "SPLoss",
    "SelfDistillationLoss",
    "SparseKDLoss",
    "TOFDAuthorsLoss",
    "TOFDLoss",
    "VIDLoss",
]
