"""The distillation methods of the CIFAR recipes (``benchmark-cifar100``, ``dih``), as a registry.

A method turns a :class:`MethodSetup` (the student and teacher names, the trained teacher, the
KD hyper-parameters, and a callback to train extra phases) into a :class:`Built`: the
``build`` callable the engine calls to make the student side (a
:class:`~reference_trainers.engine.DistillStep`) and the teacher side it reads. Select them by
name (``--method kd,fitnet,at``); add one with :func:`register_method`.

Built in (defaults of the community CIFAR-100 benchmark: RepDistiller, the code of Tian, Krishnan &
Isola's CRD paper, ICLR 2020):

==========  ===================================================================================
``ce``      the student alone, cross-entropy (no teacher)
``kd``      ``ce_weight * CE + kd_weight * KL_T^2`` (Hinton et al., 2015)
``fitnet``  FitNets hint, one stage as in the benchmark: ``CE + 100 * MSE(r(f_s), f_t)`` on the
            benchmark's hint layers (student and teacher ``hint_path``), ``r`` a trainable 3x3
            conv-BN-ReLU regressor on the student side (Romero et al., ICLR 2015)
``fitnet2`` FitNets in two stages, as in the DIH paper: stage 1 trains the student up to its
            guided layer and the regressor on the hint alone (``--fitnet-stage1-epochs``,
            SGD nesterov); stage 2 is ``kd`` from those weights
``at``      attention transfer on every stage pair of equal resolution: ``CE + 1000 * sum_j
            mean_i (a_s - a_t)^2`` (Zagoruyko & Komodakis, ICLR 2017; the benchmark's beta)
``dkd``     decoupled KD (Zhao et al., CVPR 2022) when ``kdloss.DKDLoss`` exists
``dist``    DIST (Huang et al., NeurIPS 2022) when ``kdloss.DISTLoss`` exists
``sp``      CE + 3000 * SP on the last stage; ``pkt``: CE + 30000 * PKT and ``rkd``: CE + RKD
            (25 distance + 50 angle) on the penultimate feature; ``nst``: CE + 50 * NST on the
            stage pairs (the benchmark's weights), when kdloss has the loss
``dih``     DIH (Asadian et al., 2021): heads fine-tuned on the frozen teacher
            (``kdloss.IntermediateHeads``, ``finetune_heads``), then ``kdloss.CohortLoss``
==========  ===================================================================================

``crd`` and ``takd`` are registered by :mod:`reference_trainers.methods.contrastive`; ``cc``, ``vid``,
``ab``, ``ft``, ``fsp``, ``reviewkd``, ``mhkd`` and ``tofd`` by
:mod:`reference_trainers.methods.feature` (imported at the end of this module).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kdloss
from reference_trainers.engine import DistillStep
from reference_trainers.errors import TrainerError
from reference_trainers.methods import AttentionStep, CEStep, HintStep, KDStep, TeacherOutputs
from reference_trainers.models import build_model, feature_shapes, head_paths, model_spec, stage_paths

__all__ = [
    "METHODS",
    "Built",
    "MethodEntry",
    "MethodSetup",
    "PhaseTrainer",
    "get_method",
    "matching_stage_pairs",
    "register_method",
]

PhaseTrainer = Callable[[str, Callable[[], DistillStep], "nn.Module | None", int, str], DistillStep]
"""``train_phase(name, build, teacher_side, epochs, optimizer_kind) -> trained step``: the recipe's
callback to run an extra phase (FitNets stage 1, a TA) through the engine, checkpointed and
resumable like every run. ``optimizer_kind`` is ``"main"`` (the recipe's) or ``"nesterov"``."""


@dataclass(frozen=True)
class MethodSetup:
    """Everything a method may need to build one student run.

    ``train_batches`` re-iterates the augmented, normalised training batches ``(images, labels)``
    on the device (for head fine-tuning); ``shared`` is one dict for the whole recipe run, where a
    method keeps what all seeds reuse (the fine-tuned DIH heads of the teacher).
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


@dataclass(frozen=True)
class Built:
    """A method's run: ``build()`` makes the student side; ``teacher`` is the teacher side (or None)."""

    build: Callable[[], DistillStep]
    teacher: nn.Module | None


@dataclass(frozen=True)
class MethodEntry:
    """A registered method: its name, a one-line description, and ``make(setup) -> Built``.

    ``missing`` names what this installation lacks to run it (``None``: available).
    """

    name: str
    help: str
    make: Callable[[MethodSetup], Built]
    missing: str | None = None


METHODS: dict[str, MethodEntry] = {}


def register_method(entry: MethodEntry, *, replace: bool = False) -> None:
    """Add a method to :data:`METHODS` (``replace=True`` to overwrite one, e.g. an unavailable slot).

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


def _hint_shapes(setup: MethodSetup) -> tuple[str, str, tuple[int, ...], tuple[int, ...]]:
    s_path, t_path = model_spec(setup.student).hint_path, model_spec(setup.teacher).hint_path
    (s_shape,) = feature_shapes(build_model(setup.student, setup.num_classes), [s_path]).values()
    (t_shape,) = feature_shapes(setup.teacher_model, [t_path]).values()
    if s_shape[1:] != t_shape[1:]:
        raise TrainerError(
            f"FitNets pairs {setup.student}.{s_path} {s_shape} with {setup.teacher}.{t_path} {t_shape}: "
            "their spatial sizes differ, which this regressor (a same-size 3x3 conv) does not handle"
        )
    return s_path, t_path, s_shape, t_shape


def _make_ce(setup: MethodSetup) -> Built:
    return Built(lambda: CEStep(build_model(setup.student, setup.num_classes)), None)


def _make_kd(setup: MethodSetup) -> Built:
    def build() -> DistillStep:
        return KDStep(
            build_model(setup.student, setup.num_classes),
            temperature=setup.temperature,
            kd_weight=setup.kd_weight,
            ce_weight=setup.ce_weight,
        )

    return Built(build, TeacherOutputs(setup.teacher_model))


def _regressor(s_shape: tuple[int, ...], t_shape: tuple[int, ...]) -> kdloss.ConvAdapter:
    # The benchmark's ConvReg for equal resolutions: 3x3 conv, BN, ReLU.
    return kdloss.ConvAdapter(s_shape[0], t_shape[0], kernel_size=3, bn=True, relu=True)


def _make_fitnet(setup: MethodSetup) -> Built:
    s_path, t_path, s_shape, t_shape = _hint_shapes(setup)
    weight = float(setup.options.get("hint_weight", 100.0))

    def build() -> DistillStep:
        return HintStep(
            build_model(setup.student, setup.num_classes),
            s_path,
            _regressor(s_shape, t_shape),
            hint_weight=weight,
            ce_weight=1.0,
        )

    return Built(build, TeacherOutputs(setup.teacher_model, {"features": t_path}))


class HintOnlyStep(DistillStep):
    """FitNets stage 1: ``MSE(regressor(f_s), f_t)`` only; the student's layers after the guided
    layer are frozen (``requires_grad=False``) so the optimiser and weight decay leave them alone."""

    def __init__(self, student: nn.Module, path: str, adapter: nn.Module) -> None:
        super().__init__()
        self.student = student
        self.path = path
        self.adapter = adapter
        self.hint = kdloss.HintLoss()
        self.objective = kdloss.WeightedSum(hint=1.0)
        self._tap = kdloss.FeatureTap(student, [path])
        self._tap.attach()
        guided = dict(student.named_modules())[path]
        needed = {id(p) for p in guided.parameters()}
        # Everything that runs before the guided layer keeps its gradients: the parameters whose
        # module is the guided one, a prefix of it, or registered before it.
        names = [n for n, _ in student.named_parameters()]
        order = {n: i for i, n in enumerate(names)}
        last_needed = max(order[n] for n, p in student.named_parameters() if id(p) in needed)
        for n, p in student.named_parameters():
            p.requires_grad_(order[n] <= last_needed)

    def forward(self, images: Tensor, labels: Tensor, teacher: dict[str, Tensor] | None) -> kdloss.LossParts:
        self.student(images)
        if teacher is None or "features" not in teacher:
            raise KeyError("HintOnlyStep needs the teacher output 'features'")
        out: kdloss.LossParts = self.objective(
            hint=self.hint(self.adapter(self._tap[self.path]).float(), teacher["features"].float())
        )
        return out


def _make_fitnet2(setup: MethodSetup) -> Built:
    if setup.train_phase is None:
        raise TrainerError("method 'fitnet2' needs a recipe that can train its stage 1 (train_phase)")
    s_path, t_path, s_shape, t_shape = _hint_shapes(setup)
    epochs = int(setup.options.get("fitnet_stage1_epochs", 40))
    t_side = TeacherOutputs(setup.teacher_model, {"features": t_path})
    stage1 = setup.train_phase(
        "fitnet2-stage1",
        lambda: HintOnlyStep(build_model(setup.student, setup.num_classes), s_path, _regressor(s_shape, t_shape)),
        t_side,
        epochs,
        "nesterov",
    )
    weights = {k: v.detach().clone() for k, v in stage1.student.state_dict().items()}

    def build() -> DistillStep:
        student = build_model(setup.student, setup.num_classes)
        student.load_state_dict(weights)
        return KDStep(student, temperature=setup.temperature, kd_weight=setup.kd_weight, ce_weight=setup.ce_weight)

    return Built(build, TeacherOutputs(setup.teacher_model))


def _make_at(setup: MethodSetup) -> Built:
    pairs = matching_stage_pairs(setup.student, setup.teacher)
    if not pairs:
        raise TrainerError(
            f"attention transfer found no stages of equal resolution in {setup.student} and {setup.teacher}"
        )
    beta = float(setup.options.get("at_beta", 1000.0))

    def build() -> DistillStep:
        return AttentionStep(
            build_model(setup.student, setup.num_classes),
            [s for s, _ in pairs],
            beta=beta,
            at_weight=1.0,
            ce_weight=1.0,
        )

    return Built(build, TeacherOutputs(setup.teacher_model, {f"at{i}": t for i, (_, t) in enumerate(pairs)}))


class DKDStep(DistillStep):
    """``ce_weight * CE + DKDLoss(alpha, beta, T)`` with DKD's linear warm-up over epochs.

    The epoch is counted from the training steps (``steps_per_epoch``), kept in a buffer so a
    resumed run continues the warm-up where it stopped.
    """

    def __init__(self, student: nn.Module, loss: nn.Module, *, ce_weight: float, steps_per_epoch: int) -> None:
        super().__init__()
        self.student = student
        self.dkd = loss
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.steps: Tensor
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.objective = kdloss.WeightedSum(dkd=1.0, ce=ce_weight)

    def forward(self, images: Tensor, labels: Tensor, teacher: dict[str, Tensor] | None) -> kdloss.LossParts:
        if teacher is None or "logits" not in teacher:
            raise KeyError("DKDStep needs the teacher output 'logits'")
        logits = self.student(images)
        epoch = float(self.steps) / self.steps_per_epoch
        if self.training:
            self.steps += 1
        out: kdloss.LossParts = self.objective(
            dkd=self.dkd(logits, teacher["logits"], labels, epoch=epoch), ce=F.cross_entropy(logits.float(), labels)
        )
        return out


def _make_dkd(setup: MethodSetup) -> Built:
    loss_cls: Any = getattr(kdloss, "DKDLoss")  # noqa: B009

    def build() -> DistillStep:
        loss = loss_cls(
            alpha=float(setup.options.get("dkd_alpha", 1.0)),
            beta=float(setup.options.get("dkd_beta", 8.0)),
            temperature=setup.temperature,
            warmup_epochs=float(setup.options.get("dkd_warmup", 20.0)),
        )
        steps = int(setup.options.get("steps_per_epoch", 1))
        return DKDStep(build_model(setup.student, setup.num_classes), loss, ce_weight=1.0, steps_per_epoch=steps)

    return Built(build, TeacherOutputs(setup.teacher_model))


class LogitStep(DistillStep):
    """``ce_weight * CE + loss(student_logits, teacher_logits)`` for a logit-only kdloss module."""

    def __init__(self, student: nn.Module, loss: nn.Module, name: str, *, ce_weight: float) -> None:
        super().__init__()
        self.student = student
        self.loss = loss
        self.name = name
        self.objective = kdloss.WeightedSum(**{name: 1.0, "ce": ce_weight})

    def forward(self, images: Tensor, labels: Tensor, teacher: dict[str, Tensor] | None) -> kdloss.LossParts:
        if teacher is None or "logits" not in teacher:
            raise KeyError(f"LogitStep({self.name}) needs the teacher output 'logits'")
        logits = self.student(images)
        terms = {self.name: self.loss(logits, teacher["logits"]), "ce": F.cross_entropy(logits.float(), labels)}
        out: kdloss.LossParts = self.objective(**terms)
        return out


def _make_dist(setup: MethodSetup) -> Built:
    loss_cls: Any = getattr(kdloss, "DISTLoss")  # noqa: B009

    def build() -> DistillStep:
        # DIST's CIFAR setting: CE + DIST with beta = gamma = 2, T = 4.
        loss = loss_cls(beta=2.0, gamma=2.0, temperature=setup.temperature)
        return LogitStep(build_model(setup.student, setup.num_classes), loss, "dist", ce_weight=1.0)

    return Built(build, TeacherOutputs(setup.teacher_model))


class CohortTeacher(nn.Module):
    """The DIH teacher side: ``{"logits": (B, C), "cohort": (B, k + 1, C)}`` from the frozen
    teacher and its fine-tuned intermediate heads (batch first, so the engine can cache it)."""

    def __init__(self, model: nn.Module, heads: nn.Module) -> None:
        super().__init__()
        self.teacher = kdloss.FrozenTeacher(model)
        self.heads = heads

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        with torch.no_grad():
            out = self.heads(images)
            cohort = out.cohort()  # (k + 1, B, C): the heads, then the final classifier
        return {"logits": out.logits, "cohort": cohort.transpose(0, 1)}


class CohortStep(DistillStep):
    """DIH's student step: ``kdloss.CohortLoss`` over the teacher's cohort (every head + the final
    classifier), ``sum_j [alpha * T^2 * KL_j + (1 - alpha) * CE]`` in the authors' form."""

    def __init__(self, student: nn.Module, loss: nn.Module) -> None:
        super().__init__()
        self.student = student
        self.cohort = loss

    def forward(self, images: Tensor, labels: Tensor, teacher: dict[str, Tensor] | None) -> kdloss.LossParts:
        if teacher is None or "cohort" not in teacher:
            raise KeyError("CohortStep needs the teacher output 'cohort' (CohortTeacher)")
        logits = self.student(images)
        out: kdloss.LossParts = self.cohort(logits.float(), teacher["cohort"].transpose(0, 1).float(), labels)
        return out


def _make_dih(setup: MethodSetup) -> Built:
    key = f"dih-heads/{setup.teacher}/{id(setup.teacher_model)}"
    heads = setup.shared.get(key)
    if heads is None:
        if setup.train_batches is None:
            raise TrainerError("method 'dih' needs the recipe's training batches to fine-tune the teacher's heads")
        model = setup.teacher_model.requires_grad_(False).eval()
        device = next(model.parameters()).device
        example = torch.zeros(2, 3, 32, 32, device=device)
        heads = kdloss.IntermediateHeads(model, head_paths(setup.teacher), setup.num_classes, example_input=example)
        heads.to(device)
        epochs = int(setup.options.get("head_epochs", 20))
        result = kdloss.finetune_heads(heads, setup.train_batches, epochs=epochs, lr=1e-3)
        if torch.distributed.is_initialized():  # every rank saw its own shard: keep rank 0's heads
            for t in [*heads.parameters(), *heads.buffers()]:
                torch.distributed.broadcast(t.data, 0)
        log = setup.options.get("log")
        if callable(log):
            losses = ", ".join(f"{x:.3f}" for x in result.head_losses)
            log(
                f"DIH: {len(result.head_losses)} heads on {setup.teacher} fine-tuned for {epochs} epochs "
                f"(last-epoch CE per head: {losses}); backbone unchanged: {result.backbone_unchanged}"
            )
        setup.shared[key] = heads
    t_side = CohortTeacher(setup.teacher_model, heads)

    def build() -> DistillStep:
        loss = kdloss.CohortLoss(setup.temperature, setup.kd_weight, form="authors")
        return CohortStep(build_model(setup.student, setup.num_classes), loss)

    return Built(build, t_side)


class _TappedStepBase(DistillStep):
    """A student step that reads ``paths`` of its student with a persistent FeatureTap."""

    def __init__(self, student: nn.Module, paths: list[str]) -> None:
        super().__init__()
        self.student = student
        self.paths = list(paths)
        self._tap = kdloss.FeatureTap(student, self.paths)
        self._tap.attach()

    def _features(self) -> list[Tensor]:
        return [self._tap[p] for p in self.paths]


class FeatureRelationStep(_TappedStepBase):
    """``CE + beta * loss(student features, teacher features)`` for kdloss's feature-relation losses
    (SP, PKT, RKD, NST): ``loss`` gets the list of tapped student features and the teacher's
    ``"rel0"``, ``"rel1"``, ... (a single tensor each when ``single``)."""

    def __init__(self, student: nn.Module, paths: list[str], loss: nn.Module, name: str, *, beta: float, single: bool):
        super().__init__(student, paths)
        self.loss = loss
        self.name = name
        self.single = single
        self.objective = kdloss.WeightedSum(**{name: beta, "ce": 1.0})

    def forward(self, images: Tensor, labels: Tensor, teacher: dict[str, Tensor] | None) -> kdloss.LossParts:
        logits = self.student(images)
        feats = [f.float() for f in self._features()]
        if teacher is None or any(f"rel{i}" not in teacher for i in range(len(feats))):
            raise KeyError(f"FeatureRelationStep({self.name}) needs the teacher outputs rel0 .. rel{len(feats) - 1}")
        t_feats = [teacher[f"rel{i}"].float() for i in range(len(feats))]
        value = self.loss(feats[0], t_feats[0]) if self.single else self.loss(feats, t_feats)
        out: kdloss.LossParts = self.objective(**{self.name: value, "ce": F.cross_entropy(logits.float(), labels)})
        return out


# name -> (kdloss class, default beta of the community benchmark, which features, help)
_RELATIONS: dict[str, tuple[str, float, str, str]] = {
    "sp": ("SPLoss", 3000.0, "last", "similarity-preserving KD on the last stage (Tung & Mori, ICCV 2019)"),
    "pkt": ("PKTLoss", 30000.0, "penultimate", "probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018)"),
    "rkd": ("RKDLoss", 1.0, "penultimate", "relational KD, distance 25 + angle 50 (Park et al., CVPR 2019)"),
    "nst": ("NSTLoss", 50.0, "stages", "neuron selectivity transfer on every stage pair (Huang & Wang, 2017)"),
}


def _make_relation(name: str) -> Callable[[MethodSetup], Built]:
    cls_name, default_beta, which, _ = _RELATIONS[name]

    def make(setup: MethodSetup) -> Built:
        s_spec, t_spec = model_spec(setup.student), model_spec(setup.teacher)
        if which == "penultimate":
            pairs = [(s_spec.feature_path, t_spec.feature_path)]
        elif which == "last":
            pairs = [(s_spec.stage_paths[-1], t_spec.stage_paths[-1])]
        else:
            pairs = matching_stage_pairs(setup.student, setup.teacher)
        beta = float(setup.options.get(f"{name}_beta", default_beta))
        loss_cls: Any = getattr(kdloss, cls_name)

        def build() -> DistillStep:
            student = build_model(setup.student, setup.num_classes)
            return FeatureRelationStep(
                student, [s for s, _ in pairs], loss_cls(), name, beta=beta, single=which == "penultimate"
            )

        t_side = TeacherOutputs(setup.teacher_model, {f"rel{i}": t for i, (_, t) in enumerate(pairs)})
        return Built(build, t_side)

    return make


register_method(MethodEntry("ce", "the student alone (cross-entropy)", _make_ce))
register_method(MethodEntry("kd", "Hinton KD: ce_weight * CE + kd_weight * KL_T^2", _make_kd))
register_method(
    MethodEntry("fitnet", "FitNets hint (one stage, CE + 100 * MSE, 3x3 conv-BN-ReLU regressor)", _make_fitnet)
)
register_method(MethodEntry("fitnet2", "FitNets in two stages (hint pre-training, then KD), as in DIH", _make_fitnet2))
register_method(MethodEntry("at", "attention transfer on equal-resolution stage pairs (CE + beta 1000)", _make_at))
register_method(MethodEntry("dkd", "decoupled KD (CE + DKD, alpha 1, beta 8, 20-epoch warm-up)", _make_dkd))
register_method(MethodEntry("dist", "DIST (CE + inter/intra-class Pearson relations, beta = gamma = 2)", _make_dist))
for _name, (_cls, _beta, _which, _help) in _RELATIONS.items():
    register_method(MethodEntry(_name, f"{_help}: CE + {_beta:g} * {_cls}", _make_relation(_name)))
register_method(
    MethodEntry("dih", "DIH: fine-tune heads on the frozen teacher, then the cohort teaches (CohortLoss)", _make_dih)
)


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` (for freezing a trained teacher independently of the run's step)."""
    return copy.deepcopy(model)


from reference_trainers.methods import feature as _method_extra  # noqa: E402, F401  (cc, vid, ab, ft, fsp, reviewkd, mhkd, tofd)
