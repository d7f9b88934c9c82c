"""Textbook hint references: FitNets' MSE (Romero et al., ICLR 2015) and the tutorial's cosine hidden loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def hint_mse(student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
    """FitNets: plain MSE (mean over all elements)."""
    return F.mse_loss(student_feature, teacher_feature)


def cosine_hidden(student_hidden: Tensor, teacher_hidden: Tensor) -> Tensor:
    """The tutorial's hidden loss: CosineEmbeddingLoss with target +1."""
    target = torch.ones(student_hidden.shape[0], device=student_hidden.device)
    return torch.nn.CosineEmbeddingLoss()(student_hidden.flatten(1), teacher_hidden.flatten(1), target)
