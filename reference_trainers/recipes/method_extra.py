"""Deprecated: CC, FSP moved to :mod:`reference_trainers.methods.relational`; VID, AB, FT,
ReviewKD to :mod:`reference_trainers.methods.feature`; MHKD, TOFD to
:mod:`reference_trainers.methods.cohort`; the steps to :mod:`reference_trainers.methods.steps`.

This module re-exports the names it had, for code written against earlier versions; it will be
removed in a later release. ``PreActTap`` and ``PreActTeacher`` are now thin wrappers of
:class:`kdloss.FeatureTap` and :class:`~reference_trainers.methods.TeacherOutputs` on the
models' ``preact_paths``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from torch import Tensor, nn

import kdloss
from reference_trainers.errors import TrainerError
from reference_trainers.methods import (
    CohortOptions,
    FeatureLossStep,
    FeatureOptions,
    FTPretrainStep,
    HeadsStep,
    HeadsTeacher,
    MethodSetup,
    ParaphrasedTeacher,
    RelationalOptions,
    TeacherOutputs,
)
from reference_trainers.methods.feature import AB_INIT_SCALE

__all__ = [
    "AB_INIT_SCALE",
    "CC_WEIGHT",
    "FT_WEIGHT",
    "INIT_EPOCHS",
    "MHKD_HEAD_WEIGHT",
    "REVIEWKD_WARMUP",
    "REVIEWKD_WEIGHT",
    "VID_WEIGHT",
    "FTPretrainStep",
    "FeatureLossStep",
    "HeadsStep",
    "HeadsTeacher",
    "ParaphrasedTeacher",
    "PreActTap",
    "PreActTeacher",
]

warnings.warn(
    "reference_trainers.recipes.method_extra is deprecated: import from reference_trainers.methods",
    FutureWarning,
    stacklevel=2,
)

CC_WEIGHT = RelationalOptions.cc_weight
VID_WEIGHT = FeatureOptions.vid_weight
FT_WEIGHT = FeatureOptions.ft_weight
MHKD_HEAD_WEIGHT = CohortOptions.mhkd_head_weight
REVIEWKD_WEIGHT = FeatureOptions.reviewkd_weight
REVIEWKD_WARMUP = FeatureOptions.reviewkd_warmup
INIT_EPOCHS = MethodSetup.init_epochs


def _preact_paths(model: nn.Module, stages: Sequence[str]) -> list[str]:
    paths = getattr(model, "preact_paths", None)
    by_stage = {p.split(".")[0]: p for p in paths} if paths is not None else {}
    if any(st not in by_stage for st in stages):
        raise TrainerError(
            f"AB needs pre-ReLU stage maps; {type(model).__name__} exposes no preact_paths for {list(stages)} "
            "(supported: the CIFAR ResNets, WRN, VGG)"
        )
    return [by_stage[st] for st in stages]


class PreActTap:
    """The pre-ReLU maps of ``stages`` of ``model``: a :class:`kdloss.FeatureTap` on its ``preact_paths``.

    Attached at construction; :meth:`get` returns the maps of the last forward (with their graph),
    :meth:`remove` removes the hooks.
    """

    def __init__(self, model: nn.Module, stages: Sequence[str]) -> None:
        self.paths = _preact_paths(model, stages)
        self._tap = kdloss.FeatureTap(model, self.paths)
        self._tap.attach()

    def get(self) -> list[Tensor]:
        return [self._tap[p] for p in self.paths]

    def remove(self) -> None:
        self._tap.remove()


def PreActTeacher(model: nn.Module, stages: Sequence[str]) -> TeacherOutputs:
    """AB's teacher side: ``{"logits", "pre0", "pre1", ...}``, the pre-ReLU stage maps, no grad."""
    return TeacherOutputs(model, {f"pre{i}": p for i, p in enumerate(_preact_paths(model, stages))})
