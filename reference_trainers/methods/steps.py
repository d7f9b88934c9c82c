"""Ready-made student sides (:class:`~reference_trainers.engine.DistillStep`) and the teacher side.

Each step owns the student and its extra trainable modules, reads student features with a
persistent :class:`kdloss.FeatureTap` (attached once at construction, so it also works with a
compiled student), and returns a :class:`kdloss.LossParts` built by :class:`kdloss.WeightedSum`
from kdloss's public losses. The teacher's outputs arrive as a dict, produced by
:class:`TeacherOutputs` (or read from the engine's cache, same keys):

============================  =====================================  ============================
step                          loss                                   teacher keys used
============================  =====================================  ============================
:class:`CEStep`               ``ce``                                 none
:class:`KDStep`               ``kd * KDLoss + ce * CE``              ``logits``
:class:`HintStep`             ``hint * HintLoss(adapter(f_s), f_t)``  ``features``
                              ``+ ce * CE`` (``+ kd * KDLoss``)
:class:`CosineStep`           ``hidden * CosineHiddenLoss + ce * CE``  ``features``
:class:`AttentionStep`        ``at * AttentionLoss + ce * CE``        ``at0``, ``at1``, ...
                              (``+ kd * KDLoss``)
============================  =====================================  ============================

To write a new method, subclass :class:`~reference_trainers.engine.DistillStep` the same way:
submodules for everything trainable, the loss arithmetic from :mod:`kdloss`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

import kdloss
from reference_trainers.engine import DistillStep

__all__ = ["AttentionStep", "CEStep", "CosineStep", "HintStep", "KDStep", "TeacherOutputs"]


def _need(teacher: dict[str, Tensor] | None, key: str, step: str) -> Tensor:
    if teacher is None or key not in teacher:
        have = sorted(teacher) if teacher is not None else None
        raise KeyError(f"{step} needs the teacher output {key!r}; the teacher side gave {have}")
    return teacher[key]


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


class _TappedStep(DistillStep):
    def __init__(self, student: nn.Module, paths: Sequence[str] = ()) -> None:
        super().__init__()
        self.student = student
        self.paths = list(paths)
        self._tap = kdloss.FeatureTap(student, self.paths) if self.paths else None
        if self._tap is not None:
            self._tap.attach()

    def _features(self) -> list[Tensor]:
        if self._tap is None:
            return []
        return [self._tap[p] for p in self.paths]


class CEStep(_TappedStep):
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


class KDStep(_TappedStep):
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


class HintStep(_TappedStep):
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
        (feature,) = self._features()
        terms = {
            "hint": self.hint(self.adapter(feature).float(), _need(teacher, "features", "HintStep").float()),
            "ce": F.cross_entropy(logits.float(), labels),
        }
        if self.kd is not None:
            terms["kd"] = self.kd(logits, _need(teacher, "logits", "HintStep"))
        out: kdloss.LossParts = self.objective(**terms)
        return out


class CosineStep(_TappedStep):
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
        (feature,) = self._features()
        t = _need(teacher, "features", "CosineStep")
        out: kdloss.LossParts = self.objective(
            hidden=self.cosine(feature.flatten(1).float(), t.flatten(1).float()),
            ce=F.cross_entropy(logits.float(), labels),
        )
        return out


class AttentionStep(_TappedStep):
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
        feats = self._features()
        t_feats = [_need(teacher, f"at{i}", "AttentionStep") for i in range(len(feats))]
        terms = {"at": self.at(feats, t_feats), "ce": F.cross_entropy(logits.float(), labels)}
        if self.kd is not None:
            terms["kd"] = self.kd(logits, _need(teacher, "logits", "AttentionStep"))
        out: kdloss.LossParts = self.objective(**terms)
        return out
