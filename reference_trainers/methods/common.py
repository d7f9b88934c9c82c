"""What several method families need: stage geometry, pre-activation paths, an init phase, the device."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from reference_trainers.engine import DistillStep
from reference_trainers.errors import TrainerError
from reference_trainers.methods.registry import Built, MethodSetup
from reference_trainers.methods.steps import CEStep
from reference_trainers.models import build_model, feature_shapes, model_spec, stage_paths

__all__ = [
    "freeze_classifier",
    "init_then_ce",
    "matching_stage_pairs",
    "module_device",
    "preact_paths",
    "shapes",
    "stage_pairs",
]


def matching_stage_pairs(student: str, teacher: str) -> list[tuple[str, str]]:
    """Pairs ``(student stage, teacher stage)`` of equal spatial size, in the student's stage order.

    Models with as many stages, of the same resolutions, pair stage by stage (the community
    benchmark's ``feat[1:-1]``); otherwise each student stage is paired with the deepest teacher
    stage of its resolution (the block output just before the next down-sampling).

    Example:
        >>> matching_stage_pairs("resnet8", "resnet18")
        [('layer1', 'layer1'), ('layer2', 'layer2'), ('layer3', 'layer3')]
    """
    s_shapes = feature_shapes(build_model(student, 10), stage_paths(student), model_spec(student).input_size)
    t_shapes = feature_shapes(build_model(teacher, 10), stage_paths(teacher), model_spec(teacher).input_size)
    s_sizes = [shape[-2:] for shape in s_shapes.values()]
    if s_sizes == [shape[-2:] for shape in t_shapes.values()]:
        return list(zip(s_shapes, t_shapes))
    pairs = []
    for s_path, s_shape in s_shapes.items():
        same = [t for t, t_shape in t_shapes.items() if t_shape[-2:] == s_shape[-2:]]
        if same:
            pairs.append((s_path, same[-1]))
    return pairs


def stage_pairs(setup: MethodSetup, method: str) -> tuple[list[str], list[str]]:
    """:func:`matching_stage_pairs` of the setup's models as two lists; raise when there is none."""
    pairs = matching_stage_pairs(setup.student, setup.teacher)
    if not pairs:
        raise TrainerError(f"{method} found no stages of equal resolution in {setup.student} and {setup.teacher}")
    return [s for s, _ in pairs], [t for _, t in pairs]


def shapes(model: nn.Module, paths: Sequence[str]) -> list[tuple[int, ...]]:
    """The per-sample shapes of ``model``'s outputs at ``paths`` (a probe forward)."""
    return [tuple(s) for s in feature_shapes(model, list(paths)).values()]


def module_device(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter."""
    return next(module.parameters()).device


def freeze_classifier(student: nn.Module, name: str) -> None:
    """Freeze the classifier of model ``name``: an init phase trains the layers before it
    (RepDistiller's ``get_feat_modules``), so it stays out of the optimiser and of weight decay."""
    dict(student.named_modules())[model_spec(name).classifier_path].requires_grad_(False)


def preact_paths(model: nn.Module, name: str, stages: Sequence[str]) -> list[str]:
    """The module paths whose outputs are the pre-ReLU maps of ``stages`` (the model's ``preact_paths``).

    The CIFAR ResNets expose an ``nn.Identity`` before each block's last ReLU, VGG its blocks'
    last BatchNorm, WRN its stage outputs (its blocks are pre-activation).

    Raises:
        TrainerError: the model exposes none for one of the stages.
    """
    paths = getattr(model, "preact_paths", None)
    if paths is None:
        raise TrainerError(
            f"AB needs pre-ReLU stage maps; {name} ({type(model).__name__}) exposes no preact_paths "
            "(supported: the CIFAR ResNets, WRN, VGG)"
        )
    by_stage = {p.split(".")[0]: p for p in paths}
    missing = [st for st in stages if st not in by_stage]
    if missing:
        raise TrainerError(f"AB: no pre-activation path for stages {missing} of {name} (preact_paths: {paths})")
    return [by_stage[st] for st in stages]


def init_then_ce(setup: MethodSetup, name: str, init_build: Callable[[], DistillStep], t_side: nn.Module) -> Built:
    """An init phase of ``setup.init_epochs`` (``<name>-init``, through the recipe's ``train_phase``),
    then plain cross-entropy from its weights (RepDistiller's AB and FSP)."""
    if setup.train_phase is None:
        raise TrainerError(f"method {name!r} needs a recipe that can train its init phase (train_phase)")
    init = setup.train_phase(f"{name}-init", init_build, t_side, setup.init_epochs, "main")
    weights = {k: v.detach().clone() for k, v in init.student.state_dict().items()}

    def build() -> DistillStep:
        student = setup.build_student()
        student.load_state_dict(weights)
        return CEStep(student)

    return Built(build, None)
