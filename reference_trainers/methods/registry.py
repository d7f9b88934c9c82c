"""What a method is: :class:`MethodSetup` in, :class:`Built` out, listed as a :class:`MethodEntry`.

A method turns a :class:`MethodSetup` (the student and teacher names, the trained teacher, the
KD hyper-parameters, its family's typed options, and a callback to train extra phases) into a
:class:`Built`: the ``build`` callable the engine calls to make the student side (a
:class:`~reference_trainers.engine.DistillStep`) and the teacher side it reads. The table of
methods, :data:`METHODS`, is written out in :mod:`reference_trainers.methods`; select them by
name (:func:`get_method`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from reference_trainers.engine import DistillStep
from reference_trainers.errors import TrainerError
from reference_trainers.methods.options import (
    AttentionOptions,
    CohortOptions,
    ContrastiveOptions,
    FeatureOptions,
    HintOptions,
    LogitOptions,
    RelationalOptions,
)
from reference_trainers.models import build_model

__all__ = [
    "METHODS",
    "Built",
    "MethodEntry",
    "MethodSetup",
    "PhaseTrainer",
    "available_methods",
    "get_method",
    "register_method",
]

PhaseTrainer = Callable[[str, Callable[[], DistillStep], "nn.Module | None", int, str], DistillStep]
"""``train_phase(name, build, teacher_side, epochs, optimizer_kind) -> trained step``: the recipe's
callback to run an extra phase (FitNets stage 1, a TA) through the engine, checkpointed and
resumable like every run. ``optimizer_kind`` is ``"main"`` (the recipe's) or ``"nesterov"``."""

# The keys of the untyped ``options`` mapping of earlier versions: key -> (option group, field).
# The group "" is the setup itself.
_LEGACY_OPTIONS: dict[str, tuple[str, str]] = {
    "hint_weight": ("hint", "weight"),
    "fitnet_stage1_epochs": ("hint", "stage1_epochs"),
    "at_beta": ("attention", "beta"),
    "dkd_alpha": ("logit", "dkd_alpha"),
    "dkd_beta": ("logit", "dkd_beta"),
    "dkd_warmup": ("logit", "dkd_warmup"),
    "ta": ("logit", "ta"),
    "ta_epochs": ("logit", "ta_epochs"),
    "sp_beta": ("relational", "sp_weight"),
    "pkt_beta": ("relational", "pkt_weight"),
    "rkd_beta": ("relational", "rkd_weight"),
    "nst_beta": ("relational", "nst_weight"),
    "cc_weight": ("relational", "cc_weight"),
    "vid_weight": ("feature", "vid_weight"),
    "ft_weight": ("feature", "ft_weight"),
    "reviewkd_weight": ("feature", "reviewkd_weight"),
    "reviewkd_warmup": ("feature", "reviewkd_warmup"),
    "head_epochs": ("cohort", "head_epochs"),
    "n_data": ("contrastive", "n_data"),
    "crd_labels": ("contrastive", "labels"),
    "crd_negatives": ("contrastive", "negatives"),
    "crd_weight": ("contrastive", "weight"),
    "crd_ce_weight": ("contrastive", "ce_weight"),
    "crd_kd_weight": ("contrastive", "kd_weight"),
    "recipe": ("contrastive", "preset"),
    "crd_feat_dim": ("contrastive", "feat_dim"),
    "crd_nce_k": ("contrastive", "n_negatives"),
    "crd_nce_t": ("contrastive", "temperature"),
    "crd_nce_m": ("contrastive", "momentum"),
    "steps_per_epoch": ("", "steps_per_epoch"),
    "init_epochs": ("", "init_epochs"),
    "epochs": ("", "epochs"),
    "log": ("", "log"),
    "resume": ("", "resume"),
    "heads_dir": ("", "checkpoint_dir"),
}


@dataclass(frozen=True)
class MethodSetup:
    """Everything a method may need to build one student run.

    ``train_batches`` re-iterates the augmented, normalised training batches ``(images, labels)``
    on the device (for head fine-tuning); ``shared`` is one dict for the whole recipe run, where a
    method keeps what all seeds reuse (the fine-tuned heads of the teacher).

    Attributes:
        student / teacher: the model names (:func:`reference_trainers.models.build_model`).
        teacher_model: the trained teacher.
        num_classes: the classifier's outputs.
        temperature / ce_weight / kd_weight: the recipe's KD setting.
        train_phase: the recipe's :data:`PhaseTrainer` (methods with extra phases need one).
        options: the untyped options of earlier versions (deprecated: use the typed fields); each
            key is moved into its typed field, an unknown key is refused.
        train_batches / shared: see above.
        student_factory: builds the student (default: ``build_model(student, num_classes)``).
        steps_per_epoch: training steps per epoch (the warm-ups count epochs from steps).
        epochs: the run's epochs.
        init_epochs: epochs of an init or pre-training phase (``ab``, ``fsp``, ``ft``; RepDistiller's 30).
        resume: the recipe resumes (``mhkd``/``tofd`` then read their saved teacher heads).
        checkpoint_dir: where ``mhkd``/``tofd`` save the teacher's fine-tuned heads (rank 0), or None.
        log: prints a line to the run's log (rank 0), or None.
        logit / hint / attention / relational / feature / contrastive / cohort: each family's options.
    """

    student: str
    teacher: str
    teacher_model: nn.Module
    num_classes: int
    temperature: float
    ce_weight: float
    kd_weight: float
    train_phase: PhaseTrainer | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    train_batches: Iterable[tuple[Tensor, Tensor]] | None = None
    shared: dict[str, Any] = field(default_factory=dict)
    student_factory: Callable[[], nn.Module] | None = None
    steps_per_epoch: int = 1
    epochs: int = 1
    init_epochs: int = 30
    resume: bool = False
    checkpoint_dir: Path | None = None
    log: Callable[[str], None] | None = None
    logit: LogitOptions = field(default_factory=LogitOptions)
    hint: HintOptions = field(default_factory=HintOptions)
    attention: AttentionOptions = field(default_factory=AttentionOptions)
    relational: RelationalOptions = field(default_factory=RelationalOptions)
    feature: FeatureOptions = field(default_factory=FeatureOptions)
    contrastive: ContrastiveOptions = field(default_factory=ContrastiveOptions)
    cohort: CohortOptions = field(default_factory=CohortOptions)

    def __post_init__(self) -> None:
        if not self.options:
            return
        unknown = sorted(k for k in self.options if k not in _LEGACY_OPTIONS)
        if unknown:
            raise TypeError(
                f"MethodSetup options {unknown} are not method options; known keys: "
                f"{', '.join(sorted(_LEGACY_OPTIONS))} (better: the typed fields, e.g. "
                "MethodSetup(..., hint=HintOptions(weight=100.0)))"
            )
        warnings.warn(
            "MethodSetup(options={...}) is deprecated: pass the typed fields instead (steps_per_epoch=..., "
            "hint=HintOptions(...), contrastive=ContrastiveOptions(...), ...)",
            FutureWarning,
            stacklevel=3,
        )
        groups: dict[str, dict[str, Any]] = {}
        for key, value in self.options.items():
            group, name = _LEGACY_OPTIONS[key]
            if value is not None:  # None meant "the default"
                groups.setdefault(group, {})[name] = Path(value) if name == "checkpoint_dir" else value
        for name, value in groups.pop("", {}).items():
            object.__setattr__(self, name, value)
        for group, values in groups.items():
            object.__setattr__(self, group, replace(getattr(self, group), **values))
        object.__setattr__(self, "options", {})

    def build_student(self) -> nn.Module:
        """A new student: ``student_factory()`` when given, else ``build_model(student, num_classes)``."""
        if self.student_factory is not None:
            return self.student_factory()
        return build_model(self.student, self.num_classes)

    def say(self, message: str) -> None:
        """Print ``message`` to the run's log (``log``), or warn when there is none."""
        if self.log is not None:
            self.log(message)
        else:
            warnings.warn(message, stacklevel=3)


@dataclass(frozen=True)
class Built:
    """A method's run: ``build()`` makes the student side; ``teacher`` is the teacher side (or None)."""

    build: Callable[[], DistillStep]
    teacher: nn.Module | None


@dataclass(frozen=True)
class MethodEntry:
    """A method in :data:`METHODS`: its name, a one-line description, and ``make(setup) -> Built``.

    ``missing`` names what this installation lacks to run it (``None``: available).
    """

    name: str
    help: str
    make: Callable[[MethodSetup], Built]
    missing: str | None = None


METHODS: dict[str, MethodEntry] = {}
"""Every method by name; filled in one place, :mod:`reference_trainers.methods`."""


def register_method(entry: MethodEntry, *, replace: bool = False) -> None:
    """Add a method of your own to :data:`METHODS` (``replace=True`` to overwrite one).

    Raises:
        ValueError: if the name is taken and ``replace`` is false.
    """
    if entry.name in METHODS and not replace:
        raise ValueError(f"method {entry.name!r} is already registered; pass replace=True to overwrite it")
    METHODS[entry.name] = entry


def get_method(name: str) -> MethodEntry:
    """The available method ``name``.

    Raises:
        TrainerError: for an unknown name (listing the known ones) or an unavailable method (saying
            what is missing).
    """
    entry = METHODS.get(name)
    if entry is None:
        raise TrainerError(f"unknown method {name!r}; available: {', '.join(available_methods())}")
    if entry.missing is not None:
        raise TrainerError(f"method {name!r} is not available in this installation: {entry.missing}")
    return entry


def available_methods() -> list[str]:
    """Names of the methods that can run here."""
    return [n for n, e in METHODS.items() if e.missing is None]
