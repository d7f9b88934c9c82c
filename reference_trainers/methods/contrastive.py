"""``crd`` and ``takd``: the CIFAR recipes' contrastive (CRD) and teacher-assistant (TAKD) methods.

Registered in :data:`reference_trainers.methods.registry.METHODS` on import (the CIFAR
recipes import this module).

``crd``: ``ce_weight * CE + kd_weight * KL_T^2 + crd_weight * CRD`` with :class:`kdloss.CRDLoss`
on the penultimate features (the models' ``feature_path``, flattened) of student and teacher
(Tian, Krishnan & Isola, ICLR 2020). The loss's two embedding heads are trainable parameters of
the step and its two memory banks and normalisers ``Z`` are buffers of the step, so they are in
the optimiser and in every checkpoint (a resumed run continues with the saved banks and ``Z``).
The banks have one row per sample of the training split actually trained on (after the
validation split is carved out); the engine passes each batch's indices into that split
(:attr:`~reference_trainers.engine.DistillStep.needs_index`). Under DDP the banks are updated on
every rank from the all-gathered embeddings, so DDP is told not to broadcast them
(:meth:`~reference_trainers.engine.DistillStep.ddp_unsynced_buffers`); the heads are synchronised
by DDP like the student.

Weights (``--crd-weight``, ``--crd-ce-weight``, ``--crd-kd-weight``; unset: the recipe's preset):

* ``benchmark-cifar100``: the community benchmark's CRD run (RepDistiller ``-r 1 -a 0 -b 0.8``):
  ``CE + 0.8 * CRD``; ``--crd-kd-weight 1`` gives its "CRD+KD" row.
* ``dih``: DIH's CRD baseline (alpha 0.1, beta 0.03): ``0.9 * CE + 0.1 * KL_T^2 + 0.03 * CRD``
  (the authors used batch 128 for it: pass ``--batch-size 128``).

CRD's own settings default to RepDistiller's: ``--crd-feat-dim 128``, ``--crd-nce-k 16384``,
``--crd-nce-t 0.07``, ``--crd-nce-m 0.5`` (a ``--crd-nce-k`` not smaller than the training split is
clamped to its size minus one, with a warning in the log), and its "exact" negatives (``--crd-negatives class``:
``K`` samples of the other classes, distinct when there are enough; the labels come from the
training split); ``--crd-negatives uniform`` draws from the whole bank.

``takd`` (Mirzadeh et al., AAAI 2020), one teacher assistant: ``--ta MODEL`` is trained with KD
from the teacher (a checkpointed, resumable phase ``takd-ta-<MODEL>`` of ``--ta-epochs``, default
``--epochs``), then the student with KD from the trained assistant; both with the recipe's KD
setting (``--temperature``, ``--ce-weight``, ``--kd-weight``).
"""

from __future__ import annotations

import argparse
import math
import warnings
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

import kdloss
from reference_trainers.engine import DistillStep
from reference_trainers.errors import TrainerError
from reference_trainers.methods import KDStep, TeacherOutputs
from reference_trainers.methods.registry import Built, MethodEntry, MethodSetup, register_method
from reference_trainers.models import MODEL_NAMES, build_model, feature_shapes, model_spec
from reference_trainers.recipes.common import nonnegative_float, positive_float, positive_int, unit_float

__all__ = ["CRD_PRESETS", "CRDStep", "add_crd_arguments", "crd_options"]

CRD_PRESETS: dict[str, tuple[float | None, float | None, float]] = {
    # recipe -> (ce weight, kd weight, crd weight); None: the recipe's --ce-weight / --kd-weight
    "benchmark-cifar100": (1.0, 0.0, 0.8),
    "dih": (None, None, 0.03),
}


class CRDStep(DistillStep):
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
        super().__init__()
        self.student = student
        self.path = path
        self.crd = crd
        self.kd = kdloss.KDLoss(temperature) if kd_weight > 0 else None
        weights = {"crd": crd_weight, "ce": ce_weight, **({"kd": kd_weight} if kd_weight > 0 else {})}
        self.objective = kdloss.WeightedSum(**weights)
        self._tap = kdloss.FeatureTap(student, [path])
        self._tap.attach()

    def forward(
        self, images: Tensor, labels: Tensor, teacher: dict[str, Tensor] | None, index: Tensor | None = None
    ) -> kdloss.LossParts:
        if index is None:
            raise ValueError("CRDStep needs index= (each sample's row in the CRD banks); the engine passes it")
        if teacher is None or "features" not in teacher or "logits" not in teacher:
            have = sorted(teacher) if teacher is not None else None
            raise KeyError(f"CRDStep needs the teacher outputs 'logits' and 'features'; the teacher side gave {have}")
        logits = self.student(images)
        f_s = self._tap[self.path].float()
        terms = {
            "crd": self.crd(f_s, teacher["features"].float(), index),
            "ce": F.cross_entropy(logits.float(), labels),
        }
        if self.kd is not None:
            terms["kd"] = self.kd(logits, teacher["logits"])
        out: kdloss.LossParts = self.objective(**terms)
        return out

    def ddp_unsynced_buffers(self) -> list[str]:
        """The CRD memory's buffers: every rank applies the same all-gathered update to them."""
        return sorted(f"crd.memory.{n}" for n, _ in self.crd.memory.named_buffers())


def _opt(setup: MethodSetup, key: str, default: Any) -> Any:
    value = setup.options.get(key)
    return default if value is None else value


def _make_crd(setup: MethodSetup) -> Built:
    n_data = setup.options.get("n_data")
    if not isinstance(n_data, int) or n_data < 1:
        raise TrainerError(
            "method 'crd' needs the size of the training split (options['n_data']) to size its memory banks"
        )
    preset = CRD_PRESETS.get(str(setup.options.get("recipe")), (None, None, 0.8))
    ce_w = float(_opt(setup, "crd_ce_weight", setup.ce_weight if preset[0] is None else preset[0]))
    kd_w = float(_opt(setup, "crd_kd_weight", setup.kd_weight if preset[1] is None else preset[1]))
    crd_w = float(_opt(setup, "crd_weight", preset[2]))
    s_path, t_path = model_spec(setup.student).feature_path, model_spec(setup.teacher).feature_path
    (s_shape,) = feature_shapes(build_model(setup.student, setup.num_classes), [s_path]).values()
    (t_shape,) = feature_shapes(setup.teacher_model, [t_path]).values()
    s_dim, t_dim = math.prod(s_shape), math.prod(t_shape)
    feat_dim, nce_k = int(_opt(setup, "crd_feat_dim", 128)), int(_opt(setup, "crd_nce_k", 16384))
    nce_t, nce_m = float(_opt(setup, "crd_nce_t", 0.07)), float(_opt(setup, "crd_nce_m", 0.5))
    if nce_k >= n_data:
        # A small training split (--smoke, --train-subset) cannot supply 16384 distinct rows:
        # kdloss.CRDLoss refuses K >= n_data, the recipe clamps and says so.
        clamped = n_data - 1
        if clamped < 1:
            raise TrainerError(f"crd needs at least 2 training images for its negatives, got n_data={n_data}")
        log = setup.options.get("log")
        message = (
            f"CRD: --crd-nce-k {nce_k} is not smaller than the {n_data} training images; "
            f"using {clamped} negatives per sample (results are not comparable with K = 16384)"
        )
        if callable(log):
            log(message)
        else:
            warnings.warn(message, stacklevel=2)
        nce_k = clamped
    negatives = str(_opt(setup, "crd_negatives", "class"))
    labels = setup.options.get("crd_labels") if negatives == "class" else None
    if negatives == "class" and not isinstance(labels, Tensor):
        raise TrainerError(
            "crd with --crd-negatives class needs the training split's labels (options['crd_labels']); "
            "this batch source has none: use --crd-negatives uniform"
        )

    def build() -> DistillStep:
        crd = kdloss.CRDLoss(
            s_dim,
            t_dim,
            n_data,
            feat_dim=feat_dim,
            n_negatives=nce_k,
            temperature=nce_t,
            momentum=nce_m,
            negatives="class" if negatives == "class" else "uniform",
            labels=labels,
        )
        return CRDStep(
            build_model(setup.student, setup.num_classes),
            s_path,
            crd,
            temperature=setup.temperature,
            ce_weight=ce_w,
            kd_weight=kd_w,
            crd_weight=crd_w,
        )

    return Built(build, TeacherOutputs(setup.teacher_model, {"features": t_path}))


def _make_takd(setup: MethodSetup) -> Built:
    ta = setup.options.get("ta")
    if not ta:
        raise TrainerError("method 'takd' needs a teacher assistant: pass --ta MODEL (e.g. --ta resnet20)")
    if ta not in MODEL_NAMES:
        raise TrainerError(f"--ta {ta!r} is not a registered model; choose one of {', '.join(MODEL_NAMES)}")
    if setup.train_phase is None:
        raise TrainerError("method 'takd' needs a recipe that can train its assistant phase (train_phase)")
    epochs = int(_opt(setup, "ta_epochs", _opt(setup, "epochs", 1)))

    def build_ta() -> DistillStep:
        return KDStep(
            build_model(str(ta), setup.num_classes),
            temperature=setup.temperature,
            kd_weight=setup.kd_weight,
            ce_weight=setup.ce_weight,
        )

    log = setup.options.get("log")
    if callable(log):
        log(f"TAKD: training the assistant {ta} with KD from {setup.teacher} for {epochs} epochs")
    ta_step = setup.train_phase(f"takd-ta-{ta}", build_ta, TeacherOutputs(setup.teacher_model), epochs, "main")
    assistant = ta_step.student.eval()

    def build() -> DistillStep:
        return KDStep(
            build_model(setup.student, setup.num_classes),
            temperature=setup.temperature,
            kd_weight=setup.kd_weight,
            ce_weight=setup.ce_weight,
        )

    return Built(build, TeacherOutputs(assistant))


def add_crd_arguments(p: argparse.ArgumentParser) -> None:
    """The ``crd`` and ``takd`` options of the CIFAR recipes."""
    g = p.add_argument_group("crd / takd")
    g.add_argument(
        "--crd-weight", type=nonnegative_float, default=None, help="CRD weight beta (benchmark 0.8, dih 0.03)"
    )
    g.add_argument(
        "--crd-ce-weight", type=nonnegative_float, default=None, help="crd's CE weight (benchmark 1, dih --ce-weight)"
    )
    g.add_argument(
        "--crd-kd-weight", type=nonnegative_float, default=None, help="crd's KD weight (benchmark 0, dih --kd-weight)"
    )
    g.add_argument("--crd-feat-dim", type=positive_int, default=128, help="CRD embedding width (default: %(default)s)")
    g.add_argument(
        "--crd-nce-k", type=positive_int, default=16384, help="CRD negatives per sample (default: %(default)s)"
    )
    g.add_argument("--crd-nce-t", type=positive_float, default=0.07, help="CRD temperature (default: %(default)s)")
    g.add_argument("--crd-nce-m", type=unit_float, default=0.5, help="CRD bank momentum (default: %(default)s)")
    g.add_argument(
        "--crd-negatives",
        default="class",
        choices=("class", "uniform"),
        help="CRD negatives: other classes, RepDistiller's 'exact' (class), or the whole bank (uniform) "
        "(default: %(default)s)",
    )
    g.add_argument("--ta", default=None, choices=MODEL_NAMES, metavar="MODEL", help="takd's teacher assistant")
    g.add_argument("--ta-epochs", type=positive_int, default=None, help="takd's assistant epochs (default: --epochs)")


def crd_options(args: argparse.Namespace, recipe: str, *, train: Any, epochs: int) -> dict[str, Any]:
    """The :class:`MethodSetup` options of ``crd`` and ``takd`` from the parsed arguments.

    ``train`` is the training batch source: its ``num_samples`` sizes the banks and its ``labels``
    (when it has them) drive the class-aware negatives.
    """
    labels = getattr(train, "labels", None)
    return {
        "recipe": recipe,
        "n_data": int(train.num_samples),
        "crd_labels": labels.detach().cpu() if isinstance(labels, Tensor) else None,
        "crd_negatives": args.crd_negatives,
        "epochs": epochs,
        "crd_weight": args.crd_weight,
        "crd_ce_weight": args.crd_ce_weight,
        "crd_kd_weight": args.crd_kd_weight,
        "crd_feat_dim": args.crd_feat_dim,
        "crd_nce_k": args.crd_nce_k,
        "crd_nce_t": args.crd_nce_t,
        "crd_nce_m": args.crd_nce_m,
        "ta": args.ta,
        "ta_epochs": args.ta_epochs if not args.smoke else 1,
    }


register_method(
    MethodEntry(
        "crd",
        "CRD: CE + beta * contrastive loss with memory banks (benchmark: CE 1, beta 0.8; dih: alpha 0.1, beta 0.03)",
        _make_crd,
    ),
    replace=True,
)
register_method(
    MethodEntry("takd", "TAKD: the assistant --ta learns with KD from the teacher, the student from it", _make_takd),
    replace=True,
)
