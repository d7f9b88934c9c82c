"""More methods of the CIFAR recipes: CC, VID, AB, FT, FSP, ReviewKD (``benchmark-cifar100``) and
MHKD, TOFD (``dih``), added to :data:`reference_trainers.methods.registry.METHODS`.

Weights are the community benchmark's (CRD / RepDistiller ``train_student.py``, cross-entropy
weight 1, no KL term) unless said; every trainable part (adapter, regressor, connector,
translator, fusion, student heads) is an attribute of the student step, so the optimiser, the
checkpoint and ``--resume`` see it. Init / pre-training phases run through the recipe's
:data:`~reference_trainers.methods.registry.PhaseTrainer` (checkpointed and resumable).

============  =================================================================================
``cc``        ``CE + 0.02 * CCLoss(variant="repdistiller")`` on the penultimate feature, the
              student's through a trainable ``kdloss.LinearAdapter(D_s, D_t)`` (Peng et al.,
              ICCV 2019)
``vid``       ``CE + 1 * sum_j VIDLoss`` on every equal-resolution stage pair, one
              ``kdloss.VIDRegressor(C_s, C_t, C_t)`` per pair (Ahn et al., CVPR 2019)
``ab``        init phase (``--init-epochs``, 30 in RepDistiller): the student's layers before the
              classifier and one ``kdloss.ABConnector`` per stage learn ``3/1000 * sum_j
              2^(j-n+1) * ABLoss`` (batch mean) on the pre-ReLU stage maps (RepDistiller's
              ``ABLoss``: stage weights, ``/ B``, ``/ 1000 * 3``); then ``CE`` from those weights
              (weight 0 in the main phase, as RepDistiller) (Heo et al., AAAI 2019)
``ft``        pre-training phase: ``kdloss.FTParaphraser(C_t, rate=0.5, batch_norm=False)``
              (RepDistiller's paraphraser) learns to reconstruct the teacher's last stage map
              (MSE, ``--init-epochs``), then is frozen on the teacher side; main: ``CE + 200 *
              FTLoss(variant="repdistiller", reduction="mean")`` (RepDistiller's
              ``FactorTransfer`` and its weight) with a trainable ``FTTranslator`` on the
              student's last stage map (Kim et al., NeurIPS 2018)
``fsp``       init phase: the student's layers before the classifier learn
              ``FSPLoss(variant="repdistiller")`` on the stem and stage maps; then ``CE`` (weight
              0 in the main phase, as RepDistiller) (Yim et al., CVPR 2017)
``reviewkd``  ``CE + 1 * min(1, epoch / 20) * HCLLoss(ReviewKDFusion(stage maps), teacher stage
              maps)``, the fusion ``mid_channels = min(512, C_s last)`` (Chen et al., CVPR 2021;
              weight 1 and the 20-epoch warm-up as in its CIFAR-100 code and mdistiller)
``mhkd``      (``dih``) ``kdloss.IntermediateHeads(head="mhkd")`` fine-tuned on the frozen teacher;
              the same heads on the student train with it: ``MultiHeadKDLoss(T, alpha,
              weights=[0.5, ..., 0.5, 1])`` over every head pair (weight 0.5, the DIH authors'
              ``mhkd_beta``) and the final classifiers (weight 1); ``alpha`` is ``--kd-weight``
``tofd``      (``dih``) as ``mhkd`` with ``head="tofd"`` and ``TOFDLoss(T, alpha, beta=0.05,
              gamma=1e-3)``: the heads' features (student side through ``kdloss.adapter_for``
              adapters) and the adapters' orthogonality (Zhang et al., NeurIPS 2020)
============  =================================================================================
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kdloss
from reference_trainers.engine import DistillStep, atomic_write_bytes
from reference_trainers.errors import TrainerError
from reference_trainers.methods import CEStep, TeacherOutputs
from reference_trainers.methods.registry import (
    Built,
    MethodEntry,
    MethodSetup,
    matching_stage_pairs,
    register_method,
)
from reference_trainers.models import build_model, feature_shapes, head_paths, model_spec, stage_paths

__all__ = [
    "FTPretrainStep",
    "FeatureLossStep",
    "HeadsStep",
    "HeadsTeacher",
    "ParaphrasedTeacher",
    "PreActTap",
]

# The community benchmark's weights (RepDistiller train_student.py / its README commands).
CC_WEIGHT = 0.02
VID_WEIGHT = 1.0
FT_WEIGHT = 200.0  # for FTLoss(variant="repdistiller", reduction="mean"), RepDistiller's FactorTransfer
AB_INIT_SCALE = 3.0 / 1000.0  # RepDistiller's ABLoss: each stage's term / 1000 * 3
MHKD_HEAD_WEIGHT = 0.5  # the DIH authors' MHKD: each intermediate head pair weighs 0.5, the final pair 1
REVIEWKD_WEIGHT = 1.0
REVIEWKD_WARMUP = 20.0
INIT_EPOCHS = 30


class PreActTap:
    """The pre-ReLU output of the last block of each stage of a :class:`CifarResNet`-style model.

    The block computes ``relu(out + shortcut)`` with its ``relu`` module; a forward pre-hook on that
    module keeps a clone of its input at each call, so after a forward the last call's input (the
    block's pre-activation sum) is what :meth:`get` returns. The clone keeps the graph, so the
    student's pre-activations carry gradients.
    """

    def __init__(self, model: nn.Module, stages: Sequence[str]) -> None:
        mods = dict(model.named_modules())
        self.values: dict[int, Tensor] = {}
        self._handles = []
        for i, stage in enumerate(stages):
            blocks = list(mods[stage].children()) if stage in mods else []
            relu = getattr(blocks[-1], "relu", None) if blocks else None
            if not isinstance(relu, nn.Module):
                raise TrainerError(
                    f"AB needs pre-ReLU stage maps; {stage!r} of {type(model).__name__} has no last block with a "
                    "'relu' module (supported: the CIFAR ResNets, WRN, VGG)"
                )
            self._handles.append(relu.register_forward_pre_hook(self._hook(i)))

    def _hook(self, i: int) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(module: nn.Module, inputs: tuple[Any, ...]) -> None:
            self.values[i] = inputs[0].clone()

        return hook

    def get(self) -> list[Tensor]:
        return [self.values[i] for i in range(len(self._handles))]


class PreActTeacher(nn.Module):
    """Teacher side for AB: ``{"logits", "pre0", "pre1", ...}``, the pre-ReLU stage maps, no grad."""

    def __init__(self, model: nn.Module, stages: Sequence[str]) -> None:
        super().__init__()
        self.teacher = kdloss.FrozenTeacher(model)
        self._tap = PreActTap(model, stages)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        with torch.no_grad():
            out = {"logits": self.teacher(images)}
            out.update({f"pre{i}": t.detach() for i, t in enumerate(self._tap.get())})
        return out


def _preact_paths(model: nn.Module, name: str, stages: Sequence[str]) -> list[str] | None:
    """Module paths whose outputs are the pre-ReLU stage maps, or ``None`` for :class:`PreActTap`.

    WRN's stage outputs are already the pre-activation sums (its blocks are pre-activation); VGG
    exposes its blocks' last BatchNorm as ``preact_paths``; the CIFAR ResNets need the relu hook.
    """
    if model_spec(name).family == "wrn":
        return list(stages)
    paths = getattr(model, "preact_paths", None)
    if paths is None:
        return None
    by_stage = {p.split(".")[0]: p for p in paths}
    missing = [st for st in stages if st not in by_stage]
    if missing:
        raise TrainerError(f"AB: no pre-activation path for stages {missing} of {name} (preact_paths: {paths})")
    return [by_stage[st] for st in stages]


def _freeze_classifier(student: nn.Module, name: str) -> None:
    # An init phase trains the layers before the classifier (RepDistiller's get_feat_modules):
    # freezing the classifier keeps it out of the optimiser and of weight decay.
    dict(student.named_modules())[model_spec(name).classifier_path].requires_grad_(False)


class FeatureLossStep(DistillStep):
    """``ce_weight * CE + beta * warm-up * loss`` for the feature methods with trainable parts.

    ``compute(step, teacher) -> Tensor`` reads the tapped student features (``step.feats()``)
    and the teacher outputs; ``parts`` (an ``nn.Module``) holds the method's trainable parts.
    ``warmup_epochs > 0`` scales the loss by ``min(1, epoch / warmup_epochs)`` (ReviewKD), the epoch
    counted from the training steps in a buffer so a resumed run continues the warm-up; the logged
    part is then the unscaled loss, next to ``"warmup"`` (the factor).
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
        super().__init__()
        self.student = student
        self.parts = parts
        self.name = name
        self.paths = list(paths)
        self.compute = compute
        self.ce_weight = ce_weight
        self.warmup_epochs = warmup_epochs
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.steps: Tensor
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self._preact = PreActTap(student, self.paths) if preact else None
        self._tap = None if preact else kdloss.FeatureTap(student, self.paths)
        if self._tap is not None:
            self._tap.attach()
        weights = {name: beta} if ce_weight == 0 else {name: beta, "ce": ce_weight}
        self.objective = kdloss.WeightedSum(**weights)

    def feats(self) -> list[Tensor]:
        if self._preact is not None:
            return self._preact.get()
        tap = self._tap
        if tap is None:  # unreachable: __init__ sets one of the two taps
            raise RuntimeError("FeatureLossStep has no feature tap")
        return [tap[p] for p in self.paths]

    def forward(self, images: Tensor, labels: Tensor, teacher: dict[str, Tensor] | None) -> kdloss.LossParts:
        if teacher is None:
            raise KeyError(f"FeatureLossStep({self.name}) needs the teacher's outputs")
        logits = self.student(images)
        value = self.compute(self, teacher)
        factor = 1.0
        if self.warmup_epochs > 0:
            factor = min(1.0, float(self.steps) / self.steps_per_epoch / self.warmup_epochs)
        if self.training:
            self.steps += 1
        terms = {self.name: value * factor if factor != 1.0 else value}
        if self.ce_weight != 0:
            terms["ce"] = F.cross_entropy(logits.float(), labels)
        out: kdloss.LossParts = self.objective(**terms)
        if self.warmup_epochs > 0:  # log the loss itself and the warm-up factor apart
            out.parts[self.name] = value.detach()
            out.parts["warmup"] = torch.tensor(factor)
        return out


def _shapes(model: nn.Module, paths: Sequence[str]) -> list[tuple[int, ...]]:
    return [tuple(s) for s in feature_shapes(model, list(paths)).values()]


def _stage_pairs(setup: MethodSetup, method: str) -> tuple[list[str], list[str]]:
    pairs = matching_stage_pairs(setup.student, setup.teacher)
    if not pairs:
        raise TrainerError(f"{method} found no stages of equal resolution in {setup.student} and {setup.teacher}")
    return [s for s, _ in pairs], [t for _, t in pairs]


def _make_cc(setup: MethodSetup) -> Built:
    s_path, t_path = model_spec(setup.student).feature_path, model_spec(setup.teacher).feature_path
    (d_s,) = _shapes(build_model(setup.student, setup.num_classes), [s_path])
    (d_t,) = _shapes(setup.teacher_model, [t_path])
    beta = float(setup.options.get("cc_weight", CC_WEIGHT))
    loss = kdloss.CCLoss(variant="repdistiller")

    def compute(step: FeatureLossStep, teacher: dict[str, Tensor]) -> Tensor:
        (f,) = step.feats()
        out: Tensor = loss(step.parts(f.flatten(1)).float(), teacher["emb"].flatten(1).float())
        return out

    def build() -> DistillStep:
        adapter = kdloss.LinearAdapter(d_s[0], d_t[0])
        return FeatureLossStep(
            build_model(setup.student, setup.num_classes), [s_path], adapter, "cc", compute, beta=beta
        )

    return Built(build, TeacherOutputs(setup.teacher_model, {"emb": t_path}))


def _stage_parts(step: FeatureLossStep) -> nn.ModuleList:
    """``step.parts`` as the per-stage list that VID and AB build (one module per tapped stage)."""
    if not isinstance(step.parts, nn.ModuleList):
        raise TypeError(
            f"FeatureLossStep({step.name}) needs parts as an nn.ModuleList, got {type(step.parts).__name__}"
        )
    return step.parts


def _make_vid(setup: MethodSetup) -> Built:
    s_paths, t_paths = _stage_pairs(setup, "VID")
    s_shapes = _shapes(build_model(setup.student, setup.num_classes), s_paths)
    t_shapes = _shapes(setup.teacher_model, t_paths)
    beta = float(setup.options.get("vid_weight", VID_WEIGHT))
    loss = kdloss.VIDLoss()

    def compute(step: FeatureLossStep, teacher: dict[str, Tensor]) -> Tensor:
        total = torch.zeros((), device=teacher["logits"].device)
        for i, (f, reg) in enumerate(zip(step.feats(), _stage_parts(step), strict=True)):
            mean, var = reg(f)
            total = total + loss(mean.float(), teacher[f"vid{i}"].float(), var.float())
        return total

    def build() -> DistillStep:
        regs = nn.ModuleList(kdloss.VIDRegressor(s[0], t[0], t[0]) for s, t in zip(s_shapes, t_shapes, strict=True))
        return FeatureLossStep(build_model(setup.student, setup.num_classes), s_paths, regs, "vid", compute, beta=beta)

    return Built(build, TeacherOutputs(setup.teacher_model, {f"vid{i}": t for i, t in enumerate(t_paths)}))


def _init_then_ce(setup: MethodSetup, name: str, init_build: Callable[[], DistillStep], t_side: nn.Module) -> Built:
    if setup.train_phase is None:
        raise TrainerError(f"method {name!r} needs a recipe that can train its init phase (train_phase)")
    epochs = int(setup.options.get("init_epochs", INIT_EPOCHS))
    init = setup.train_phase(f"{name}-init", init_build, t_side, epochs, "main")
    weights = {k: v.detach().clone() for k, v in init.student.state_dict().items()}

    def build() -> DistillStep:
        student = build_model(setup.student, setup.num_classes)
        student.load_state_dict(weights)
        return CEStep(student)

    return Built(build, None)


def _make_ab(setup: MethodSetup) -> Built:
    s_paths, t_paths = _stage_pairs(setup, "AB")
    s_shapes = _shapes(build_model(setup.student, setup.num_classes), s_paths)
    t_shapes = _shapes(setup.teacher_model, t_paths)
    n = len(s_paths)
    loss = kdloss.ABLoss(margin=1.0)

    def compute(step: FeatureLossStep, teacher: dict[str, Tensor]) -> Tensor:
        total = torch.zeros((), device=teacher["logits"].device)
        for i, (f, conn) in enumerate(zip(step.feats(), _stage_parts(step), strict=True)):
            # RepDistiller weighs the stages 2^(i - n + 1): the deepest counts most.
            total = total + 2.0 ** (i - n + 1) * loss(conn(f).float(), teacher[f"pre{i}"].float())
        return total

    s_pre = _preact_paths(build_model(setup.student, setup.num_classes), setup.student, s_paths)
    t_pre = _preact_paths(setup.teacher_model, setup.teacher, t_paths)

    def init_build() -> DistillStep:
        student = build_model(setup.student, setup.num_classes)
        _freeze_classifier(student, setup.student)
        conns = nn.ModuleList(kdloss.ABConnector(s[0], t[0]) for s, t in zip(s_shapes, t_shapes, strict=True))
        paths = s_paths if s_pre is None else s_pre
        return FeatureLossStep(
            student, paths, conns, "ab", compute, beta=AB_INIT_SCALE, ce_weight=0.0, preact=s_pre is None
        )

    t_side: nn.Module = (
        PreActTeacher(setup.teacher_model, t_paths)
        if t_pre is None
        else TeacherOutputs(setup.teacher_model, {f"pre{i}": p for i, p in enumerate(t_pre)})
    )
    return _init_then_ce(setup, "ab", init_build, t_side)


def _make_fsp(setup: MethodSetup) -> Built:
    s_spec, t_spec = model_spec(setup.student), model_spec(setup.teacher)
    # RepDistiller's feat[:-1]: the stem, then the stages (the stages alone where a model names no stem).
    s_paths = [p for p in (s_spec.stem_path, *s_spec.stage_paths) if p is not None]
    t_paths = [p for p in (t_spec.stem_path, *t_spec.stage_paths) if p is not None]
    if len(s_paths) != len(t_paths):
        raise TrainerError(
            f"FSP pairs the stages one to one: {s_paths} of {setup.student}, {t_paths} of {setup.teacher}"
        )
    s_ch = [s[0] for s in _shapes(build_model(setup.student, setup.num_classes), s_paths)]
    t_ch = [s[0] for s in _shapes(setup.teacher_model, t_paths)]
    if s_ch != t_ch:
        raise TrainerError(
            f"FSP needs equal channel counts per stage: {setup.student} has {s_ch}, {setup.teacher} has {t_ch}"
        )
    loss = kdloss.FSPLoss(variant="repdistiller")

    def compute(step: FeatureLossStep, teacher: dict[str, Tensor]) -> Tensor:
        s = [f.float() for f in step.feats()]
        out: Tensor = loss(s, [teacher[f"fsp{i}"].float() for i in range(len(s))])
        return out

    def init_build() -> DistillStep:
        student = build_model(setup.student, setup.num_classes)
        _freeze_classifier(student, setup.student)
        return FeatureLossStep(student, s_paths, nn.Identity(), "fsp", compute, beta=1.0, ce_weight=0.0)

    t_side = TeacherOutputs(setup.teacher_model, {f"fsp{i}": t for i, t in enumerate(t_paths)})
    return _init_then_ce(setup, "fsp", init_build, t_side)


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


def _make_ft(setup: MethodSetup) -> Built:
    if setup.train_phase is None:
        raise TrainerError("method 'ft' needs a recipe that can pre-train its paraphraser (train_phase)")
    s_path, t_path = model_spec(setup.student).stage_paths[-1], model_spec(setup.teacher).stage_paths[-1]
    (s_shape,) = _shapes(build_model(setup.student, setup.num_classes), [s_path])
    (t_shape,) = _shapes(setup.teacher_model, [t_path])
    epochs = int(setup.options.get("init_epochs", INIT_EPOCHS))
    beta = float(setup.options.get("ft_weight", FT_WEIGHT))
    pre = setup.train_phase(
        "ft-paraphraser",
        lambda: FTPretrainStep(
            copy.deepcopy(setup.teacher_model), kdloss.FTParaphraser(t_shape[0], rate=0.5, batch_norm=False)
        ),
        TeacherOutputs(setup.teacher_model, {"ft": t_path}),
        epochs,
        "main",
    )
    paraphraser = pre.paraphraser
    if not isinstance(paraphraser, kdloss.FTParaphraser):
        raise TrainerError("the FT pre-training phase returned no paraphraser")
    factor_channels = int(paraphraser.factor_channels) if hasattr(paraphraser, "factor_channels") else -1
    if factor_channels <= 0:
        with torch.no_grad():
            factor_channels = int(paraphraser(torch.zeros(1, *t_shape, device=_device(paraphraser)))[0].shape[1])
    # RepDistiller's FactorTransfer: the normalised channel mean of factor^2 (H * W entries), L1,
    # mean over the batch and the entries; its weight 200 (FT_WEIGHT) belongs to this variant.
    loss = kdloss.FTLoss(variant="repdistiller", reduction="mean")

    def compute(step: FeatureLossStep, teacher: dict[str, Tensor]) -> Tensor:
        (f,) = step.feats()
        out: Tensor = loss(step.parts(f).float(), teacher["factor"].float())
        return out

    def build() -> DistillStep:
        tr = kdloss.FTTranslator(s_shape[0], factor_channels)
        return FeatureLossStep(build_model(setup.student, setup.num_classes), [s_path], tr, "ft", compute, beta=beta)

    return Built(build, ParaphrasedTeacher(setup.teacher_model, t_path, paraphraser))


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _make_reviewkd(setup: MethodSetup) -> Built:
    s_paths, t_paths = list(stage_paths(setup.student)), list(stage_paths(setup.teacher))
    if len(s_paths) != len(t_paths):
        raise TrainerError(
            f"ReviewKD pairs the stages one to one: {setup.student} has {len(s_paths)}, {setup.teacher} {len(t_paths)}"
        )
    s_shapes = _shapes(build_model(setup.student, setup.num_classes), s_paths)
    t_shapes = _shapes(setup.teacher_model, t_paths)
    if [s[1:] for s in s_shapes] != [t[1:] for t in t_shapes]:
        raise TrainerError(f"ReviewKD needs equal stage resolutions: {s_shapes} vs {t_shapes}")
    beta = float(setup.options.get("reviewkd_weight", REVIEWKD_WEIGHT))
    warmup = float(setup.options.get("reviewkd_warmup", REVIEWKD_WARMUP))
    mid = min(512, s_shapes[-1][0])
    loss = kdloss.HCLLoss()

    def compute(step: FeatureLossStep, teacher: dict[str, Tensor]) -> Tensor:
        fused = step.parts(step.feats())
        out: Tensor = loss([f.float() for f in fused], [teacher[f"rev{i}"].float() for i in range(len(fused))])
        return out

    def build() -> DistillStep:
        fusion = kdloss.ReviewKDFusion([s[0] for s in s_shapes], [t[0] for t in t_shapes], mid_channels=mid)
        steps = int(setup.options.get("steps_per_epoch", 1))
        student = build_model(setup.student, setup.num_classes)
        return FeatureLossStep(
            student, s_paths, fusion, "reviewkd", compute, beta=beta, warmup_epochs=warmup, steps_per_epoch=steps
        )

    return Built(build, TeacherOutputs(setup.teacher_model, {f"rev{i}": t for i, t in enumerate(t_paths)}))


# ---------------------------------------------------------------- MHKD / TOFD (dih recipe)


def _heads_kwargs(name: str, head: str) -> dict[str, Any]:
    kw: dict[str, Any] = {"head": head, "feature_path": model_spec(name).feature_path}
    if head == "tofd":
        kw["stages"] = stage_paths(name)
    return kw


def _head_paths(name: str, head: str) -> list[str]:
    paths = head_paths(name)
    # A TOFD head re-instantiates the stages after its own; on the last stage there are none.
    return paths[:-1] if head == "tofd" and paths and paths[-1] == stage_paths(name)[-1] else paths


class HeadsTeacher(nn.Module):
    """The teacher side of MHKD / TOFD: ``{"logits", "h_logits{j}", "h_feat{j}", "final_feature"}``
    from the frozen teacher and its fine-tuned heads, batch first (so the engine can cache them)."""

    def __init__(self, model: nn.Module, heads: nn.Module) -> None:
        super().__init__()
        self.teacher = kdloss.FrozenTeacher(model)
        self.heads = heads

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        with torch.no_grad():
            out = self.heads.eval()(images)
            res = {"logits": out.logits}
            for j, (lg, ft) in enumerate(zip(out.head_logits, out.head_features, strict=True)):
                res[f"h_logits{j}"], res[f"h_feat{j}"] = lg, ft
            if out.final_feature is not None:
                res["final_feature"] = out.final_feature
        return res


def _teacher_heads(setup: MethodSetup, head: str) -> nn.Module:
    key = f"{head}-heads/{setup.teacher}/{id(setup.teacher_model)}"
    cached: nn.Module | None = setup.shared.get(key)
    if cached is not None:
        return cached
    if setup.train_batches is None:
        raise TrainerError(f"method {head!r} needs the recipe's training batches to fine-tune the teacher's heads")
    model = setup.teacher_model.requires_grad_(False).eval()
    device = _device(model)
    example = torch.zeros(2, 3, 32, 32, device=device)
    heads = kdloss.IntermediateHeads(
        model,
        _head_paths(setup.teacher, head),
        setup.num_classes,
        example_input=example,
        **_heads_kwargs(setup.teacher, head),
    ).to(device)
    epochs = int(setup.options.get("head_epochs", 20))
    log = setup.options.get("log")
    # The fine-tuned heads are saved next to the checkpoints, so that a resumed student run reads
    # the same teacher heads as before the interruption (--resume loads them, no fine-tuning).
    heads_dir = setup.options.get("heads_dir")
    saved = Path(heads_dir) / f"{head}-teacher-heads-{setup.teacher}.pt" if heads_dir is not None else None
    if saved is not None and setup.options.get("resume") and saved.is_file():
        heads.load_state_dict(torch.load(saved, map_location=device, weights_only=True))
        if callable(log):
            log(f"{head.upper()}: teacher heads loaded from {saved}")
    else:
        result = kdloss.finetune_heads(heads, setup.train_batches, epochs=epochs, lr=1e-3)
        if callable(log):
            losses = ", ".join(f"{x:.3f}" for x in result.head_losses)
            log(f"{head.upper()}: {len(result.head_losses)} {head} heads on {setup.teacher} fine-tuned ({losses})")
        if saved is not None:
            saved.parent.mkdir(parents=True, exist_ok=True)
            buf = io.BytesIO()
            torch.save(heads.state_dict(), buf)
            atomic_write_bytes(saved, buf.getvalue())
    if torch.distributed.is_initialized():  # every rank saw its own shard (or rank 0 read the file)
        for t in [*heads.parameters(), *heads.buffers()]:
            torch.distributed.broadcast(t.data, 0)
    setup.shared[key] = heads
    return heads


class HeadsStep(DistillStep):
    """MHKD / TOFD student step: the student and its own heads (``detach=False``, trained with it).

    ``mhkd``: ``MultiHeadKDLoss`` over ``[*heads, final]`` of student and teacher. ``tofd``:
    ``TOFDLoss`` over the same pairs, plus the L2 between their features (student side through
    ``adapters``) and the adapters' orthogonality penalty.
    """

    def __init__(self, student: nn.Module, heads: nn.Module, loss: nn.Module, adapters: nn.ModuleList | None) -> None:
        super().__init__()
        self.student = student
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


def _make_heads(head: str) -> Callable[[MethodSetup], Built]:
    def make(setup: MethodSetup) -> Built:
        t_heads = _teacher_heads(setup, head)
        if len(_head_paths(setup.student, head)) != len(_head_paths(setup.teacher, head)):
            raise TrainerError(
                f"{head} pairs heads one to one: {setup.student} has {_head_paths(setup.student, head)}, "
                f"{setup.teacher} {_head_paths(setup.teacher, head)}"
            )
        device = _device(setup.teacher_model)
        example = torch.zeros(2, 3, 32, 32, device=device)
        with torch.no_grad():
            t_ex = t_heads.eval()(example)
        t_dims = [f.shape[1:] for f in [*t_ex.head_features, t_ex.final_feature]]

        def build() -> DistillStep:
            student = build_model(setup.student, setup.num_classes)
            s_heads = kdloss.IntermediateHeads(
                student,
                _head_paths(setup.student, head),
                setup.num_classes,
                example_input=torch.zeros(2, 3, 32, 32),
                detach=False,
                **_heads_kwargs(setup.student, head),
            )
            if head == "mhkd":
                k = len(s_heads.paths)
                weights = [MHKD_HEAD_WEIGHT] * k + [1.0]  # the head pairs, then the final classifiers
                loss = kdloss.MultiHeadKDLoss(setup.temperature, setup.kd_weight, weights=weights)
                return HeadsStep(student, s_heads, loss, None)
            with torch.no_grad():
                s_ex = s_heads(torch.zeros(2, 3, 32, 32))
            s_feats = [*s_ex.head_features, s_ex.final_feature]
            adapters = nn.ModuleList(
                kdloss.adapter_for(s, torch.zeros(2, *d)) for s, d in zip(s_feats, t_dims, strict=True)
            )
            tofd = kdloss.TOFDLoss(setup.temperature, setup.kd_weight, beta=0.05, gamma=1e-3)
            return HeadsStep(student, s_heads, tofd, adapters)

        return Built(build, HeadsTeacher(setup.teacher_model, t_heads))

    return make


register_method(MethodEntry("cc", "correlation congruence: CE + 0.02 * CC, linear embed on the student", _make_cc))
register_method(MethodEntry("vid", "variational information distillation: CE + 1 * VID per stage pair", _make_vid))
register_method(MethodEntry("ab", "activation boundaries: AB init phase (--init-epochs), then CE", _make_ab))
register_method(MethodEntry("ft", "factor transfer: paraphraser pre-training, then CE + 200 * FT", _make_ft))
register_method(MethodEntry("fsp", "flow of solution procedure: FSP init phase (--init-epochs), then CE", _make_fsp))
register_method(MethodEntry("reviewkd", "ReviewKD: CE + 1 * HCL(ABF fusion), 20-epoch warm-up", _make_reviewkd))
register_method(
    MethodEntry("mhkd", "MHKD: paired mhkd heads on teacher and student (MultiHeadKDLoss)", _make_heads("mhkd"))
)
register_method(
    MethodEntry("tofd", "TOFD: paired task-oriented heads, feature L2 + orthogonal adapters", _make_heads("tofd"))
)
