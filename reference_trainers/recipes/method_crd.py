"""Deprecated: ``crd`` moved to :mod:`reference_trainers.methods.contrastive`, ``takd`` to
:mod:`reference_trainers.methods.logit`, ``CRDStep`` to :mod:`reference_trainers.methods.steps`,
the CLI options to :mod:`reference_trainers.recipes.cifar_kd`.

This module re-exports the names it had, for code written against earlier versions; it will be
removed in a later release.
"""

from __future__ import annotations

import warnings

from reference_trainers.methods import CRDStep
from reference_trainers.methods.contrastive import CRD_PRESETS
from reference_trainers.recipes.cifar_kd import add_crd_arguments, crd_options

__all__ = ["CRD_PRESETS", "CRDStep", "add_crd_arguments", "crd_options"]

warnings.warn(
    "reference_trainers.recipes.method_crd is deprecated: import from reference_trainers.methods "
    "(and reference_trainers.recipes.cifar_kd for the CLI options)",
    FutureWarning,
    stacklevel=2,
)
