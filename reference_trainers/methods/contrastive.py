"""``crd``: contrastive representation distillation (kdloss's ``contrastive`` family).

``ce_weight * CE + kd_weight * KL_T^2 + crd_weight * CRD`` with :class:`kdloss.CRDLoss` on the
penultimate features (the models' ``feature_path``, flattened) of student and teacher (Tian,
Krishnan & Isola, ICLR 2020). The loss's two embedding heads are trainable parameters of the
step and its two memory banks and normalisers ``Z`` are buffers of the step, so they are in the
optimiser and in every checkpoint (a resumed run continues with the saved banks and ``Z``). The
banks have one row per sample of the training split actually trained on (after the validation
split is carved out; :attr:`~reference_trainers.methods.options.ContrastiveOptions.n_data`); the
engine passes each batch's indices into that split
(:attr:`~reference_trainers.engine.DistillStep.needs_index`). Under DDP the banks are updated on
every rank from the all-gathered embeddings, so DDP is told not to broadcast them
(:meth:`~reference_trainers.engine.DistillStep.ddp_unsynced_buffers`); the heads are synchronised
by DDP like the student.

Weights (``ContrastiveOptions.weight``, ``.ce_weight``, ``.kd_weight``; ``None``: the preset of
the recipe, :data:`CRD_PRESETS`):

* ``benchmark-cifar100``: the community benchmark's CRD run (RepDistiller ``-r 1 -a 0 -b 0.8``):
  ``CE + 0.8 * CRD``; a KD weight of 1 gives its "CRD+KD" row.
* ``dih``: DIH's CRD baseline (alpha 0.1, beta 0.03): ``0.9 * CE + 0.1 * KL_T^2 + 0.03 * CRD``
  (the authors used batch 128 for it).

CRD's own settings default to RepDistiller's (:class:`~reference_trainers.methods.options.ContrastiveOptions`):
embedding width 128, ``K = 16384`` negatives (clamped to the training split's size minus one, with
a message in the log), temperature 0.07, momentum 0.5, and its "exact" negatives (``"class"``:
``K`` samples of the other classes, distinct when there are enough; the labels come from the
training split); ``"uniform"`` draws from the whole bank.
"""

from __future__ import annotations

import math
from typing import Literal

from torch import Tensor

import kdloss
from reference_trainers.engine import DistillStep
from reference_trainers.errors import TrainerError
from reference_trainers.methods.common import shapes
from reference_trainers.methods.registry import Built, MethodSetup
from reference_trainers.methods.steps import CRDStep, TeacherOutputs
from reference_trainers.models import model_spec

__all__ = ["CRD_PRESETS", "crd_weights", "make_crd"]

CRD_PRESETS: dict[str, tuple[float | None, float | None, float]] = {
    # recipe -> (ce weight, kd weight, crd weight); None: the recipe's --ce-weight / --kd-weight
    "benchmark-cifar100": (1.0, 0.0, 0.8),
    "dih": (None, None, 0.03),
}
_DEFAULT_PRESET: tuple[float | None, float | None, float] = (None, None, 0.8)


def crd_weights(setup: MethodSetup) -> tuple[float, float, float]:
    """``(ce, kd, crd)`` weights: the options where set, else the preset's, else the setup's KD weights."""
    opts = setup.contrastive
    preset = CRD_PRESETS.get(str(opts.preset), _DEFAULT_PRESET)
    ce = opts.ce_weight if opts.ce_weight is not None else (setup.ce_weight if preset[0] is None else preset[0])
    kd = opts.kd_weight if opts.kd_weight is not None else (setup.kd_weight if preset[1] is None else preset[1])
    crd = opts.weight if opts.weight is not None else preset[2]
    return float(ce), float(kd), float(crd)


def make_crd(setup: MethodSetup) -> Built:
    """``crd``: :class:`~reference_trainers.methods.steps.CRDStep` with a :class:`kdloss.CRDLoss` sized to the split."""
    opts = setup.contrastive
    n_data = opts.n_data
    if not isinstance(n_data, int) or n_data < 1:
        raise TrainerError(
            "method 'crd' needs the size of the training split (ContrastiveOptions.n_data) to size its memory banks"
        )
    ce_w, kd_w, crd_w = crd_weights(setup)
    s_path, t_path = model_spec(setup.student).feature_path, model_spec(setup.teacher).feature_path
    (s_shape,) = shapes(setup.build_student(), [s_path])
    (t_shape,) = shapes(setup.teacher_model, [t_path])
    s_dim, t_dim = math.prod(s_shape), math.prod(t_shape)
    nce_k = opts.n_negatives
    if nce_k >= n_data:
        # A small training split (--smoke, --train-subset) cannot supply 16384 distinct rows:
        # kdloss.CRDLoss refuses K >= n_data, the recipe clamps and says so.
        clamped = n_data - 1
        if clamped < 1:
            raise TrainerError(f"crd needs at least 2 training images for its negatives, got n_data={n_data}")
        setup.say(
            f"CRD: --crd-nce-k {nce_k} is not smaller than the {n_data} training images; "
            f"using {clamped} negatives per sample (results are not comparable with K = 16384)"
        )
        nce_k = clamped
    negatives: Literal["class", "uniform"] = "class" if opts.negatives == "class" else "uniform"
    labels = opts.labels if negatives == "class" else None
    if negatives == "class" and not isinstance(labels, Tensor):
        raise TrainerError(
            "crd with --crd-negatives class needs the training split's labels (ContrastiveOptions.labels); "
            "this batch source has none: use --crd-negatives uniform"
        )

    def build() -> DistillStep:
        crd = kdloss.CRDLoss(
            s_dim,
            t_dim,
            n_data,
            feat_dim=opts.feat_dim,
            n_negatives=nce_k,
            temperature=opts.temperature,
            momentum=opts.momentum,
            negatives=negatives,
            labels=labels,
        )
        return CRDStep(
            setup.build_student(),
            s_path,
            crd,
            temperature=setup.temperature,
            ce_weight=ce_w,
            kd_weight=kd_w,
            crd_weight=crd_w,
        )

    return Built(build, TeacherOutputs(setup.teacher_model, {"features": t_path}))
