"""Every student side (:class:`~reference_trainers.engine.DistillStep`) and teacher side of the trainers.

Each step owns the student and its extra trainable modules, reads student features with a
persistent :class:`kdloss.FeatureTap` (attached once at construction, so it also works with a
compiled student), and returns a :class:`kdloss.LossParts` built by :class:`kdloss.WeightedSum`
(or by a kdloss loss that returns one) from kdloss's public losses. The teacher's outputs arrive
as a dict, produced by a teacher side (:class:`TeacherOutputs`, :class:`HeadsTeacher`,
:class:`ParaphrasedTeacher`) or read from the engine's cache, same keys:

==============================  ===========================================  ========================
step                            loss                                         teacher keys used
==============================  ===========================================  ========================
:class:`CEStep`                 ``ce``                                       none
:class:`KDStep`                 ``kd * KDLoss + ce * CE``                    ``logits``
:class:`LogitStep`              ``name * loss(z_s, z_t) + ce * CE``          ``logits``
:class:`DKDStep`                ``DKDLoss(epoch) + ce * CE``                 ``logits``
:class:`HintStep`               ``hint * HintLoss(adapter(f_s), f_t)``       ``features``
                                ``+ ce * CE`` (``+ kd * KDLoss``)
:class:`HintOnlyStep`           ``HintLoss(adapter(f_s), f_t)``              ``features``
:class:`CosineStep`             ``hidden * CosineHiddenLoss + ce * CE``      ``features``
:class:`AttentionStep`          ``at * AttentionLoss + ce * CE``             ``at0``, ``at1``, ...
                                (``+ kd * KDLoss``)
:class:`FeatureRelationStep`    ``weight * loss(f_s, f_t) + CE``             ``rel0``, ``rel1``, ...
:class:`FeatureLossStep`        ``weight * warm-up * compute(...) + ce*CE``  the method's
:class:`FTPretrainStep`         ``MSE(paraphraser(f_t), f_t)``               ``ft``
:class:`CRDStep`                ``crd * CRDLoss + ce * CE (+ kd * KDLoss)``  ``features``, ``logits``
:class:`CohortStep`             ``CohortLoss`` over the teacher's cohort     ``cohort``
:class:`HeadsStep`              ``MultiHeadKDLoss`` / ``TOFDLoss``           ``h_logits{j}``, ...
:class:`SelfDistillStep`        ``SelfDistillationLoss`` over early exits    none
:class:`LMCEStep`               next-token ``ce``                            none
:class:`LMFusedKDStep`          ``FusedLinearKDLoss`` on hidden states       ``hidden``
:class:`LMSparseKDStep`         ``SparseKDLoss`` from the teacher's top-k    ``logprobs``, ``indices``
                                                                             (``tail``)
==============================  ===========================================  ========================

The language-model steps (``LM*``) train a :class:`~reference_trainers.models.causal_lm.CausalLM`
wrapped in :class:`LMStudent`; their teacher sides are :class:`TeacherHidden` and
:class:`TeacherTopKSide`, their builders in :mod:`reference_trainers.methods.fused_linear`.

To write a new method, subclass :class:`TappedStep` the same way: submodules for everything
trainable, the loss arithmetic from :mod:`kdloss` (``docs/architecture.md`` walks through one).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kdloss
from reference_trainers.engine import DistillStep
from reference_trainers.models.causal_lm import CausalLM

__all__ = [
    "AttentionStep",
    "CEStep",
    "CRDStep",
    "CohortStep",
    "CohortTeacher",
    "CosineStep",
    "DKDStep",
    "FTPretrainStep",
    "FeatureLossStep",
    "FeatureRelationStep",
    "HeadsStep",
    "HeadsTeacher",
    "HintOnlyStep",
    "HintStep",
    "KDStep",
    "LMCEStep",
    "LMFusedKDStep",
    "LMSparseKDStep",
    "LMStudent",
    "LogitStep",
    "ParaphrasedTeacher",
    "SelfDistillStep",
    "TappedStep",
    "TeacherHidden",
    "TeacherOutputs",
    "TeacherTopKSide",
    "student_lm",
]


def _need(teacher: dict[str, Tensor] | None, key: str, step: str) -> Tensor:
    if teacher is None or key not in teacher:
        have = sorted(teacher) if teacher is not None else None
        raise KeyError(f"{step} needs the teacher output {key!r}; the teacher side gave {have}")
    return teacher[key]


# --------------------------------------------------------------------------------------------- teacher sides


class TeacherOutputs(nn.Module):
    """The teacher side: a frozen model whose logits and tapped features come back as a dict.

    ``forward(images) -> {"logits": model(images), name: transform(tapped feature), ...}``.
    The model is wrapped in :class:`kdloss.FrozenTeacher` (eval mode, no grad) and its features
    are read by a detaching :class:`kdloss.FeatureTap` attached for the object's lifetime.

    Args:
        model: the trained teacher.
        taps: ``{output name: module path}``, e.g. ``{"features": "features"}``.
        transforms: ``{output name: parameter-free module}`` applied to the tapped feature
            (e.g. ``kdloss.PoolAdapter(1024)``); its output is what the engine caches.
    """

    def __init__(
        self, model: nn.Module, taps: Mapping[str, str] | None = None, transforms: Mapping[str, nn.Module] | None = None
    ) -> None:
        super().__init__()
        self.teacher = kdloss.FrozenTeacher(model)
        self.taps = dict(taps or {})
        self.transforms = nn.ModuleDict(dict(transforms or {}))
        unknown = set(self.transforms) - set(self.taps)
        if unknown:
            raise ValueError(f"transforms {sorted(unknown)} name no tapped output; taps are {sorted(self.taps)}")
        self._tap = kdloss.FeatureTap(model, list(self.taps.values()), detach=True) if self.taps else None
        if self._tap is not None:
            self._tap.attach()

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        out = {"logits": self.teacher(images)}
        if self._tap is not None:
            for name, path in self.taps.items():
                f = self._tap[path]
                out[name] = self.transforms[name](f) if name in self.transforms else f
        return out


class ParaphrasedTeacher(TeacherOutputs):
    """FT's teacher side: the teacher's logits and ``"factor"``, its last stage map through the frozen
    pre-trained paraphraser."""

    def __init__(self, model: nn.Module, path: str, paraphraser: nn.Module) -> None:
        super().__init__(model, {"ft": path})
        self.paraphraser = paraphraser.requires_grad_(False).eval()

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        with torch.no_grad():
            out = super().forward(images)
            out["factor"] = self.paraphraser.eval()(out.pop("ft"))[0]
        return out


HeadsLayout = Literal["cohort", "paired"]
"""What :class:`HeadsTeacher` returns: ``"cohort"`` (DIH) or ``"paired"`` (MHKD / TOFD)."""


class HeadsTeacher(nn.Module):
    """The teacher side of the head methods: the frozen teacher and its fine-tuned intermediate heads.

    Batch first, so the engine can cache the outputs. ``layout="paired"`` (MHKD / TOFD):
    ``{"logits", "h_logits{j}", "h_feat{j}", "final_feature"}``, one entry per head;
    ``layout="cohort"`` (DIH): ``{"logits": (B, C), "cohort": (B, k + 1, C)}``, the heads then the
    final classifier (:meth:`kdloss.HeadsOutput.cohort`).

    Args:
        model: the trained teacher (wrapped in :class:`kdloss.FrozenTeacher`).
        heads: its :class:`kdloss.IntermediateHeads`, fine-tuned.
        layout: ``"paired"`` or ``"cohort"``.
    """

    def __init__(self, model: nn.Module, heads: nn.Module, layout: HeadsLayout = "paired") -> None:
        super().__init__()
        if layout not in ("cohort", "paired"):
            raise ValueError(f"layout must be 'cohort' or 'paired', got {layout!r}")
        self.teacher = kdloss.FrozenTeacher(model)
        self.heads = heads
        self.layout: HeadsLayout = layout

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        with torch.no_grad():
            out = self.heads.eval()(images)
            if self.layout == "cohort":
                cohort = out.cohort()  # (k + 1, B, C): the heads, then the final classifier
                return {"logits": out.logits, "cohort": cohort.transpose(0, 1)}
            res = {"logits": out.logits}
            for j, (lg, ft) in enumerate(zip(out.head_logits, out.head_features, strict=True)):
                res[f"h_logits{j}"], res[f"h_feat{j}"] = lg, ft
            if out.final_feature is not None:
                res["final_feature"] = out.final_feature
        return res


class CohortTeacher(HeadsTeacher):
    """DIH's teacher side: :class:`HeadsTeacher` with ``layout="cohort"`` (kept under its earlier name)."""

    def __init__(self, model: nn.Module, heads: nn.Module) -> None:
        super().__init__(model, heads, layout="cohort")


# --------------------------------------------------------------------------------------------- student sides


class TappedStep(DistillStep):
    """The base of the student steps: the student, its tapped ``paths``, and an optional step counter.

    ``paths`` are read with a persistent :class:`kdloss.FeatureTap` attached at construction
    (:meth:`features` returns them in order). :meth:`count_steps` adds a ``steps`` buffer (in the
    checkpoint, so a resumed run continues where it stopped) for the methods whose loss depends
    on the epoch (DKD's and ReviewKD's warm-ups): :meth:`epoch` is the training steps done so far
    divided by the steps per epoch, and :meth:`tick` counts one training step.
    """

    steps: Tensor

    def __init__(self, student: nn.Module, paths: Sequence[str] = ()) -> None:
        super().__init__()
        self.student = student
        self.paths = list(paths)
        self._tap = kdloss.FeatureTap(student, self.paths) if self.paths else None
        if self._tap is not None:
            self._tap.attach()
        self.steps_per_epoch = 1

    def features(self) -> list[Tensor]:
        """The tapped student features of the last forward, in the order of ``paths``."""
        if self._tap is None:
            return []
        return [self._tap[p] for p in self.paths]

    _features = features  # the name of earlier versions

    def count_steps(self, steps_per_epoch: int) -> None:
        """Count the training steps in a ``steps`` buffer (checkpointed); an epoch is ``steps_per_epoch`` of them."""
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def epoch(self) -> float:
        """Epochs done so far (a fraction), from the training steps counted by :meth:`count_steps`."""
        return float(self.steps) / self.steps_per_epoch

    def tick(self) -> None:
        """Count one training step (in training mode only)."""
        if self.training:
            self.steps += 1


class CEStep(TappedStep):
    """Plain cross-entropy training of ``student`` (the teacher phase and the baseline).

    Example:
        >>> import torch
        >>> step = CEStep(torch.nn.Linear(4, 3))
        >>> sorted(step(torch.randn(2, 4), torch.tensor([0, 2]), None).parts)
        ['ce', 'total']
    """

    def __init__(self, student: nn.Module) -> None:
        super().__init__(student)
        self.objective = kdloss.WeightedSum(ce=1.0)

    def forward(self, images: Tensor, labels: Tensor, teacher: dict[str, Tensor] | None) -> kdloss.LossParts:
        out: kdloss.LossParts = self.objective(ce=F.cross_entropy(self.student(images).float(), labels))
        return out


class KDStep(TappedStep):
    """Hinton KD: ``kd_weight * KDLoss(T) + ce_weight * CE`` (KL with ``T**2``, batchmean).

    Example:
        >>> import torch
        >>> step = KDStep(torch.nn.Linear(4, 3), temperature=2.0, kd_weight=0.25, ce_weight=0.75)
        >>> out = step(torch.randn(2, 4), torch.tensor([0, 2]), {"logits": torch.randn(2, 3)})
        >>> sorted(out.parts)
        ['ce', 'kd', 'total']
    """

    def __init__(self, student: nn.Module, *, temperature: float, kd_weight: float, ce_weight: float) -> None:
        super().__init__(student)
        self.kd = kdloss.KDLoss(temperature)
        self.objective = kdloss.WeightedSum(kd=kd_weight, ce=ce_weight)

    def forward(self, images: Tensor, labels: Tensor, teacher: dict[str, Tensor] | None) -> kdloss.LossParts:
        logits = self.student(images)
        out: kdloss.LossParts = self.objective(
            kd=self.kd(logits, _need(teacher, "logits", "KDStep")), ce=F.cross_entropy(logits.float(), labels)
        )
        return out


class LogitStep(TappedStep):
    """``ce_weight * CE + loss(student_logits, teacher_logits)`` for a logit-only kdloss module (DIST)."""

    def __init__(self, student: nn.Module, loss: nn.Module, name: str, *, ce_weight: float) -> None:
        super().__init__(student)
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


class DKDStep(TappedStep):
    """``ce_weight * CE + DKDLoss(alpha, beta, T)`` with DKD's linear warm-up over epochs.

    The epoch is counted from the training steps (``steps_per_epoch``), kept in a buffer so a
    resumed run continues the warm-up where it stopped.
    """

    def __init__(self, student: nn.Module, loss: nn.Module, *, ce_weight: float, steps_per_epoch: int) -> None:
        super().__init__(student)
        self.dkd = loss
        self.count_steps(steps_per_epoch)
        self.objective = kdloss.WeightedSum(dkd=1.0, ce=ce_weight)

    def forward(self, images: Tensor, labels: Tensor, teacher: dict[str, Tensor] | None) -> kdloss.LossParts:
        if teacher is None or "logits" not in teacher:
            raise KeyError("DKDStep needs the teacher output 'logits'")
        logits = self.student(images)
        epoch = self.epoch()
        self.tick()
        out: kdloss.LossParts = self.objective(
            dkd=self.dkd(logits, teacher["logits"], labels, epoch=epoch), ce=F.cross_entropy(logits.float(), labels)
        )
        return out


class HintStep(TappedStep):
    """FitNets-style hint: ``hint_weight * HintLoss(adapter(f_s), f_t) + ce_weight * CE`` (+ optional KD).

    Args:
        student: the student.
        path: the student module whose output is the hint feature (a :class:`kdloss.FeatureTap` path).
        adapter: the trainable regressor on the student side (e.g. ``kdloss.ConvAdapter(16, 32, 3)``).
        hint_weight / ce_weight: the weights.
        kd_weight / temperature: add ``kd_weight * KDLoss(temperature)`` when ``kd_weight > 0``.
    """

    def __init__(
        self,
        student: nn.Module,
        path: str,
        adapter: nn.Module,
        *,
        hint_weight: float,
        ce_weight: float,
        kd_weight: float = 0.0,
        temperature: float = 4.0,
    ) -> None:
        super().__init__(student, [path])
        self.adapter = adapter
        self.hint = kdloss.HintLoss()
        self.kd = kdloss.KDLoss(temperature) if kd_weight > 0 else None
        weights = {"hint": hint_weight, "ce": ce_weight} | ({"kd": kd_weight} if kd_weight > 0 else {})
        self.objective = kdloss.WeightedSum(**weights)

    def forward(self, images: Tensor, labels: Tensor, teacher: dict[str, Tensor] | None) -> kdloss.LossParts:
        logits = self.student(images)
        (feature,) = self.features()
        terms = {
            "hint": self.hint(self.adapter(feature).float(), _need(teacher, "features", "HintStep").float()),
            "ce": F.cross_entropy(logits.float(), labels),
        }
        if self.kd is not None:
            terms["kd"] = self.kd(logits, _need(teacher, "logits", "HintStep"))
        out: kdloss.LossParts = self.objective(**terms)
        return out


class HintOnlyStep(TappedStep):
    """FitNets stage 1: ``MSE(regressor(f_s), f_t)`` only; the student's layers after the guided
    layer are frozen (``requires_grad=False``) so the optimiser and weight decay leave them alone."""

    def __init__(self, student: nn.Module, path: str, adapter: nn.Module) -> None:
        super().__init__(student, [path])
        self.path = path
        self.adapter = adapter
        self.hint = kdloss.HintLoss()
        self.objective = kdloss.WeightedSum(hint=1.0)
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
        (feature,) = self.features()
        out: kdloss.LossParts = self.objective(
            hint=self.hint(self.adapter(feature).float(), teacher["features"].float())
        )
        return out


class CosineStep(TappedStep):
    """``hidden_weight * CosineHiddenLoss(flatten(f_s), f_t) + ce_weight * CE`` (the tutorial's phase 4).

    The teacher side provides ``"features"`` already reduced to the student's size (e.g. with
    ``kdloss.PoolAdapter(1024)`` as a :class:`TeacherOutputs` transform).
    """

    def __init__(self, student: nn.Module, path: str, *, hidden_weight: float, ce_weight: float) -> None:
        super().__init__(student, [path])
        self.cosine = kdloss.CosineHiddenLoss()
        self.objective = kdloss.WeightedSum(hidden=hidden_weight, ce=ce_weight)

    def forward(self, images: Tensor, labels: Tensor, teacher: dict[str, Tensor] | None) -> kdloss.LossParts:
        logits = self.student(images)
        (feature,) = self.features()
        t = _need(teacher, "features", "CosineStep")
        out: kdloss.LossParts = self.objective(
            hidden=self.cosine(feature.flatten(1).float(), t.flatten(1).float()),
            ce=F.cross_entropy(logits.float(), labels),
        )
        return out


class AttentionStep(TappedStep):
    """Attention transfer over several student/teacher feature pairs: ``at_weight * AttentionLoss(beta)
    + ce_weight * CE`` (+ optional KD). Teacher keys ``"at0"``, ``"at1"``, ... match ``paths`` in order.
    """

    def __init__(
        self,
        student: nn.Module,
        paths: Sequence[str],
        *,
        beta: float,
        at_weight: float = 1.0,
        ce_weight: float = 1.0,
        kd_weight: float = 0.0,
        temperature: float = 4.0,
    ) -> None:
        super().__init__(student, paths)
        self.at = kdloss.AttentionLoss(beta=beta)
        self.kd = kdloss.KDLoss(temperature) if kd_weight > 0 else None
        weights = {"at": at_weight, "ce": ce_weight} | ({"kd": kd_weight} if kd_weight > 0 else {})
        self.objective = kdloss.WeightedSum(**weights)

    def forward(self, images: Tensor, labels: Tensor, teacher: dict[str, Tensor] | None) -> kdloss.LossParts:
        logits = self.student(images)
        feats = self.features()
        t_feats = [_need(teacher, f"at{i}", "AttentionStep") for i in range(len(feats))]
        terms = {"at": self.at(feats, t_feats), "ce": F.cross_entropy(logits.float(), labels)}
        if self.kd is not None:
            terms["kd"] = self.kd(logits, _need(teacher, "logits", "AttentionStep"))
        out: kdloss.LossParts = self.objective(**terms)
        return out


class FeatureRelationStep(TappedStep):
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
        feats = [f.float() for f in self.features()]
        if teacher is None or any(f"rel{i}" not in teacher for i in range(len(feats))):
            raise KeyError(f"FeatureRelationStep({self.name}) needs the teacher outputs rel0 .. rel{len(feats) - 1}")
        t_feats = [teacher[f"rel{i}"].float() for i in range(len(feats))]
        value = self.loss(feats[0], t_feats[0]) if self.single else self.loss(feats, t_feats)
        out: kdloss.LossParts = self.objective(**{self.name: value, "ce": F.cross_entropy(logits.float(), labels)})
        return out


def _preact_tap_paths(student: nn.Module, stages: Sequence[str]) -> list[str]:
    """The modules whose outputs are the pre-ReLU maps of ``stages`` (the model's ``preact_paths``)."""
    paths = getattr(student, "preact_paths", None)
    by_stage = {p.split(".")[0]: p for p in paths} if paths is not None else {}
    missing = [st for st in stages if st not in by_stage]
    if missing:
        raise ValueError(
            f"{type(student).__name__} exposes no pre-activation path for stages {missing} (its preact_paths: "
            f"{paths}); the CIFAR ResNets, WRN and VGG have them"
        )
    return [by_stage[st] for st in stages]


class FeatureLossStep(TappedStep):
    """``ce_weight * CE + beta * warm-up * loss`` for the feature methods with trainable parts.

    ``compute(step, teacher) -> Tensor`` reads the tapped student features (``step.feats()``)
    and the teacher outputs; ``parts`` (an ``nn.Module``) holds the method's trainable parts.
    ``warmup_epochs > 0`` scales the loss by ``min(1, epoch / warmup_epochs)`` (ReviewKD), the epoch
    counted from the training steps in a buffer so a resumed run continues the warm-up; the logged
    part is then the unscaled loss, next to ``"warmup"`` (the factor). ``preact=True`` taps the
    pre-ReLU maps of the stages ``paths`` (the model's ``preact_paths``) instead of their outputs.
    """

    def __init__(
        self,
        student: nn.Module,
        paths: Sequence[str],
        parts: nn.Module,
        name: str,
        compute: Callable[[FeatureLossStep, dict[str, Tensor]], Tensor],
        *,
        beta: float,
        ce_weight: float = 1.0,
        warmup_epochs: float = 0.0,
        steps_per_epoch: int = 1,
        preact: bool = False,
    ) -> None:
        super().__init__(student, _preact_tap_paths(student, paths) if preact else paths)
        self.parts = parts
        self.name = name
        self.compute = compute
        self.ce_weight = ce_weight
        self.warmup_epochs = warmup_epochs
        self.count_steps(steps_per_epoch)
        weights = {name: beta} if ce_weight == 0 else {name: beta, "ce": ce_weight}
        self.objective = kdloss.WeightedSum(**weights)

    def feats(self) -> list[Tensor]:
        """The tapped student features of the last forward (:meth:`TappedStep.features`)."""
        return self.features()

    def forward(self, images: Tensor, labels: Tensor, teacher: dict[str, Tensor] | None) -> kdloss.LossParts:
        if teacher is None:
            raise KeyError(f"FeatureLossStep({self.name}) needs the teacher's outputs")
        logits = self.student(images)
        value = self.compute(self, teacher)
        factor = 1.0
        if self.warmup_epochs > 0:
            factor = min(1.0, self.epoch() / self.warmup_epochs)
        self.tick()
        terms = {self.name: value * factor if factor != 1.0 else value}
        if self.ce_weight != 0:
            terms["ce"] = F.cross_entropy(logits.float(), labels)
        out: kdloss.LossParts = self.objective(**terms)
        if self.warmup_epochs > 0:  # log the loss itself and the warm-up factor apart
            out.parts[self.name] = value.detach()
            out.parts["warmup"] = torch.tensor(factor)
        return out


class FTPretrainStep(DistillStep):
    """FT's paraphraser pre-training: ``MSE(paraphraser(f_t)[1], f_t)`` on the teacher's map ``"ft"``.

    ``student`` is a frozen copy of the teacher, kept in eval mode (the phase's evaluation reports
    the teacher); the paraphraser is the only trainable part.
    """

    def __init__(self, teacher_copy: nn.Module, paraphraser: nn.Module) -> None:
        super().__init__()
        self.student = teacher_copy.requires_grad_(False)
        self.paraphraser = paraphraser

    def train(self, mode: bool = True) -> FTPretrainStep:
        super().train(mode)
        self.student.eval()
        return self

    def forward(self, images: Tensor, labels: Tensor, teacher: dict[str, Tensor] | None) -> kdloss.LossParts:
        if teacher is None or "ft" not in teacher:
            raise KeyError("FTPretrainStep needs the teacher output 'ft'")
        f = teacher["ft"].float()
        _, recon = self.paraphraser(f)
        out: kdloss.LossParts = kdloss.WeightedSum(reconstruction=1.0)(reconstruction=F.mse_loss(recon.float(), f))
        return out


class CRDStep(TappedStep):
    """``ce_weight * CE + kd_weight * KDLoss(T) + crd_weight * CRDLoss(f_s, f_t, index)``.

    ``f_s`` is the student's output at ``path`` (read with a persistent :class:`kdloss.FeatureTap`),
    ``f_t`` the teacher output ``"features"``; ``index`` the samples' rows in the CRD banks (the
    engine passes it: ``needs_index``). The KD term is left out when ``kd_weight`` is 0.

    Example:
        >>> import torch
        >>> student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
        >>> crd = kdloss.CRDLoss(3, 5, n_data=10, feat_dim=4, n_negatives=6)
        >>> step = CRDStep(student, "1", crd, temperature=4.0, ce_weight=1.0, kd_weight=0.0, crd_weight=0.8)
        >>> teacher = {"logits": torch.randn(2, 3), "features": torch.randn(2, 5)}
        >>> out = step(torch.randn(2, 3, 2, 2), torch.tensor([0, 2]), teacher, index=torch.tensor([4, 7]))
        >>> sorted(out.parts)
        ['ce', 'crd', 'total']
        >>> step.ddp_unsynced_buffers()
        ['crd.memory.bank_student', 'crd.memory.bank_teacher', 'crd.memory.normalizers', 'crd.memory.skipped_rows']
    """

    needs_index = True

    def __init__(
        self,
        student: nn.Module,
        path: str,
        crd: kdloss.CRDLoss,
        *,
        temperature: float,
        ce_weight: float,
        kd_weight: float,
        crd_weight: float,
    ) -> None:
        super().__init__(student, [path])
        self.path = path
        self.crd = crd
        self.kd = kdloss.KDLoss(temperature) if kd_weight > 0 else None
        weights = {"crd": crd_weight, "ce": ce_weight, **({"kd": kd_weight} if kd_weight > 0 else {})}
        self.objective = kdloss.WeightedSum(**weights)

    def forward(
        self, images: Tensor, labels: Tensor, teacher: dict[str, Tensor] | None, index: Tensor | None = None
    ) -> kdloss.LossParts:
        if index is None:
            raise ValueError("CRDStep needs index= (each sample's row in the CRD banks); the engine passes it")
        if teacher is None or "features" not in teacher or "logits" not in teacher:
            have = sorted(teacher) if teacher is not None else None
            raise KeyError(f"CRDStep needs the teacher outputs 'logits' and 'features'; the teacher side gave {have}")
        logits = self.student(images)
        (f_s,) = self.features()
        terms = {
            "crd": self.crd(f_s.float(), teacher["features"].float(), index),
            "ce": F.cross_entropy(logits.float(), labels),
        }
        if self.kd is not None:
            terms["kd"] = self.kd(logits, teacher["logits"])
        out: kdloss.LossParts = self.objective(**terms)
        return out

    def ddp_unsynced_buffers(self) -> list[str]:
        """The CRD memory's buffers: every rank applies the same all-gathered update to them."""
        return sorted(f"crd.memory.{n}" for n, _ in self.crd.memory.named_buffers())


class CohortStep(TappedStep):
    """DIH's student step: ``kdloss.CohortLoss`` over the teacher's cohort (every head + the final
    classifier), ``sum_j [alpha * T^2 * KL_j + (1 - alpha) * CE]`` in the authors' form."""

    def __init__(self, student: nn.Module, loss: nn.Module) -> None:
        super().__init__(student)
        self.cohort = loss

    def forward(self, images: Tensor, labels: Tensor, teacher: dict[str, Tensor] | None) -> kdloss.LossParts:
        if teacher is None or "cohort" not in teacher:
            raise KeyError("CohortStep needs the teacher output 'cohort' (HeadsTeacher(layout='cohort'))")
        logits = self.student(images)
        out: kdloss.LossParts = self.cohort(logits.float(), teacher["cohort"].transpose(0, 1).float(), labels)
        return out


class HeadsStep(TappedStep):
    """MHKD / TOFD student step: the student and its own heads (``detach=False``, trained with it).

    ``mhkd``: ``MultiHeadKDLoss`` over ``[*heads, final]`` of student and teacher. ``tofd``:
    ``TOFDLoss`` over the same pairs, plus the L2 between their features (student side through
    ``adapters``) and the adapters' orthogonality penalty.
    """

    def __init__(self, student: nn.Module, heads: nn.Module, loss: nn.Module, adapters: nn.ModuleList | None) -> None:
        super().__init__(student)
        self.heads = heads
        self.loss = loss
        self.adapters = adapters

    def forward(self, images: Tensor, labels: Tensor, teacher: dict[str, Tensor] | None) -> kdloss.LossParts:
        if teacher is None or "h_logits0" not in teacher:
            raise KeyError("HeadsStep needs the teacher outputs h_logits0, ... (HeadsTeacher)")
        out = self.heads(images)
        k = len(out.head_logits)
        s_logits = [*out.head_logits, out.logits]
        t_logits = [*(teacher[f"h_logits{j}"] for j in range(k)), teacher["logits"]]
        s_logits = [x.float() for x in s_logits]
        t_logits = [x.float() for x in t_logits]
        if self.adapters is None:
            res: kdloss.LossParts = self.loss(s_logits, t_logits, labels)
            return res
        s_feats = [*out.head_features, out.final_feature]
        t_feats = [*(teacher[f"h_feat{j}"] for j in range(k)), teacher["final_feature"]]
        mapped = [a(f.float()) for a, f in zip(self.adapters, s_feats, strict=True)]
        weights = [p for n, p in self.adapters.named_parameters() if n.endswith("weight")]
        res = self.loss(s_logits, t_logits, labels, mapped, [t.float() for t in t_feats], weights)
        return res


class SelfDistillStep(TappedStep):
    """Self-distillation with early exits: :class:`kdloss.SelfDistillationLoss` with ``alpha = kd_weight``.

    ``CE(final) + sum_i [ce_weight * CE(h_i) + kd_weight * T^2 KL(p_final || p_i)]``, where each exit
    ``h_i`` is global average pooling + a linear classifier on a tapped student stage and the
    final output is the (detached) teacher of every exit. The exits are trained with the student
    and saved in the checkpoint; only the final classifier is evaluated. The loss's parts are
    ``ce/final``, ``ce/<i>`` and ``kd/<i>`` per exit.

    Raises:
        ValueError: if ``ce_weight + kd_weight`` is not 1 (the loss weighs the exits' CE ``1 - alpha``).
    """

    def __init__(
        self,
        student: nn.Module,
        paths: list[str],
        channels: list[int],
        num_classes: int,
        *,
        temperature: float,
        ce_weight: float,
        kd_weight: float,
    ) -> None:
        super().__init__(student, paths)
        if abs(ce_weight + kd_weight - 1.0) > 1e-9:
            raise ValueError(
                "SelfDistillStep weighs each exit's CE 1 - kd_weight (kdloss.SelfDistillationLoss's alpha), so "
                f"ce_weight + kd_weight must be 1, got ce_weight={ce_weight} and kd_weight={kd_weight}"
            )
        self.exits = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(c, num_classes)) for c in channels
        )
        self.loss = kdloss.SelfDistillationLoss(temperature, alpha=kd_weight, beta=0.0)

    def forward(self, images: Tensor, labels: Tensor, teacher: dict[str, Tensor] | None) -> kdloss.LossParts:
        logits = self.student(images)
        exit_logits = [head(f).float() for head, f in zip(self.exits, self.features(), strict=True)]
        out: kdloss.LossParts = self.loss(exit_logits, logits.float(), labels)
        return out


# --------------------------------------------------------------------------------------------- language models


class LMStudent(nn.Module):
    """The student as the engine sees it: ``forward(tokens)`` gives logits ``(B, V, L)`` (the class
    dimension second, as :func:`torch.nn.functional.cross_entropy` takes sequences and as the engine's
    accuracy reads them: argmax over dim 1 against labels ``(B, L)``); ``forward(tokens, hidden=True)``
    the final hidden states ``(B, L, d)``. ``--compile`` compiles both."""

    def __init__(self, lm: CausalLM) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, tokens: Tensor, hidden: bool = False) -> Tensor:
        if hidden:
            return self.lm.hidden(tokens)
        logits: Tensor = self.lm(tokens)
        return logits.transpose(1, 2)


def student_lm(step: DistillStep) -> CausalLM:
    """The language model inside a step's :class:`LMStudent`."""
    return cast(LMStudent, step.student).lm


class LMCEStep(DistillStep):
    """Cross-entropy on the next token."""

    def __init__(self, lm: CausalLM) -> None:
        super().__init__()
        self.student = LMStudent(lm)

    def forward(self, images: Tensor, labels: Tensor, teacher: dict[str, Tensor] | None) -> kdloss.LossParts:
        ce = F.cross_entropy(self.student(images).float(), labels)
        return kdloss.LossParts(ce, {"ce": ce.detach(), "total": ce.detach()})


class LMFusedKDStep(DistillStep):
    """``kdloss.FusedLinearKDLoss`` on the student's hidden states and the teacher's (``teacher["hidden"]``).

    The teacher's output weight is a non-persistent buffer: it moves with the step to the device,
    is neither trained nor checkpointed (it belongs to the teacher's checkpoint).
    """

    def __init__(self, lm: CausalLM, teacher_weight: Tensor, loss: kdloss.FusedLinearKDLoss) -> None:
        super().__init__()
        self.student = LMStudent(lm)
        self.register_buffer("teacher_weight", teacher_weight.detach().clone(), persistent=False)
        self.loss = loss

    def forward(self, images: Tensor, labels: Tensor, teacher: dict[str, Tensor] | None) -> kdloss.LossParts:
        hidden = self.student(images, hidden=True)
        t_hidden = _need(teacher, "hidden", "LMFusedKDStep")
        total = self.loss(hidden, student_lm(self).head.weight, t_hidden, self.teacher_weight, labels)
        return kdloss.LossParts(total, {"total": total.detach()})


class LMSparseKDStep(DistillStep):
    """``kdloss.SparseKDLoss`` from the teacher's top-k (``teacher["logprobs"]``, ``["indices"]``, ``["tail"]``)."""

    def __init__(self, lm: CausalLM, loss: kdloss.SparseKDLoss, *, use_tail: bool) -> None:
        super().__init__()
        self.student = LMStudent(lm)
        self.loss = loss
        self.use_tail = use_tail

    def forward(self, images: Tensor, labels: Tensor, teacher: dict[str, Tensor] | None) -> kdloss.LossParts:
        logits = self.student(images).transpose(1, 2)
        tail = _need(teacher, "tail", "LMSparseKDStep") if self.use_tail else None
        logprobs, indices = _need(teacher, "logprobs", "LMSparseKDStep"), _need(teacher, "indices", "LMSparseKDStep")
        total = self.loss(logits, logprobs, indices, teacher_tail=tail, labels=labels)
        return kdloss.LossParts(total, {"total": total.detach()})


class TeacherHidden(nn.Module):
    """The teacher side of the fused methods: ``{"hidden": teacher.hidden(tokens)}`` (frozen, eval mode)."""

    def __init__(self, lm: CausalLM) -> None:
        super().__init__()
        self.teacher = kdloss.FrozenTeacher(lm)

    def forward(self, tokens: Tensor) -> dict[str, Tensor]:
        with torch.no_grad():
            return {"hidden": cast(CausalLM, self.teacher.module).hidden(tokens)}


class TeacherTopKSide(nn.Module):
    """The teacher side of ``kd-topk`` when it runs online (``--no-teacher-cache``): the same top-k,
    log-probabilities and tail as the :class:`kdloss.TeacherTopK` store holds."""

    def __init__(self, lm: CausalLM, k: int) -> None:
        super().__init__()
        self.teacher = kdloss.FrozenTeacher(lm)
        self.k = k

    def forward(self, tokens: Tensor) -> dict[str, Tensor]:
        with torch.no_grad():
            lp = torch.log_softmax(self.teacher(tokens).float(), dim=-1)
            values, indices = lp.topk(self.k, dim=-1)
            tail = lp.scatter(-1, indices, float("-inf")).logsumexp(dim=-1).exp()
        return {"logprobs": values, "indices": indices, "tail": tail}
