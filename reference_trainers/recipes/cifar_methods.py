"""Deprecated: the methods' table and setup moved to :mod:`reference_trainers.methods`.

This module re-exports the names it had, for code (and documents) written against earlier
versions; it holds no experiment and will be removed in a later release. Import from
:mod:`reference_trainers.methods` (:mod:`~reference_trainers.methods.registry`,
:mod:`~reference_trainers.methods.steps`) instead.
"""

from __future__ import annotations

import copy
import warnings

from torch import nn

from reference_trainers.methods import (
    METHODS,
    Built,
    CohortStep,
    CohortTeacher,
    DKDStep,
    FeatureRelationStep,
    HintOnlyStep,
    LogitStep,
    MethodEntry,
    MethodSetup,
    PhaseTrainer,
    available_methods,
    get_method,
    matching_stage_pairs,
    register_method,
)

__all__ = [
    "METHODS",
    "Built",
    "CohortStep",
    "CohortTeacher",
    "DKDStep",
    "FeatureRelationStep",
    "HintOnlyStep",
    "LogitStep",
    "MethodEntry",
    "MethodSetup",
    "PhaseTrainer",
    "available_methods",
    "copy_model",
    "get_method",
    "matching_stage_pairs",
    "register_method",
]

warnings.warn(
    "reference_trainers.recipes.cifar_methods is deprecated: import from reference_trainers.methods",
    FutureWarning,
    stacklevel=2,
)


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` (for freezing a trained teacher independently of the run's step)."""
    return copy.deepcopy(model)
