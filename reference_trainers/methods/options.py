"""The typed options of the trainers' methods: one frozen dataclass per family, every default once.

A recipe fills the ones its command line sets and passes them in the
:class:`~reference_trainers.methods.MethodSetup`; a method reads only its own family's. The
defaults are the community benchmark's (RepDistiller, the code of Tian, Krishnan & Isola's CRD
paper, ICLR 2020) unless said; the recipes' command-line defaults are read from here.

========================  ================================================================
:class:`LogitOptions`     ``dkd``, ``dist``, ``takd`` (``ce``, ``kd`` use the setup's weights)
:class:`HintOptions`      ``fitnet``, ``fitnet2``, ``hint-last``
:class:`AttentionOptions` ``at``
:class:`RelationalOptions` ``sp``, ``pkt``, ``rkd``, ``nst``, ``cc`` (``fsp`` has an init phase only)
:class:`FeatureOptions`   ``vid``, ``ft``, ``reviewkd`` (``ab`` has an init phase only)
:class:`ContrastiveOptions` ``crd``
:class:`CohortOptions`    ``dih``, ``mhkd``, ``tofd``, ``self-distill``
:class:`FusedLinearOptions` the language-model methods of ``lm-distil``
                          (:mod:`~reference_trainers.methods.fused_linear`)
========================  ================================================================
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor

import kdloss

__all__ = [
    "AttentionOptions",
    "CohortOptions",
    "ContrastiveOptions",
    "FeatureOptions",
    "FusedLinearOptions",
    "HintOptions",
    "LogitOptions",
    "RelationalOptions",
]


@dataclass(frozen=True)
class LogitOptions:
    """Logit methods.

    Attributes:
        dkd_alpha / dkd_beta: DKD's target / non-target weights (Zhao et al., CVPR 2022: 1 and 8).
        dkd_warmup: epochs of DKD's linear warm-up (20).
        dist_beta / dist_gamma: DIST's inter- / intra-class weights (Huang et al., NeurIPS 2022: 2, 2).
        ta: TAKD's teacher assistant (a model name); ``None``: ``takd`` is refused.
        ta_epochs: the assistant's epochs; ``None``: the run's epochs.
    """

    dkd_alpha: float = 1.0
    dkd_beta: float = 8.0
    dkd_warmup: float = 20.0
    dist_beta: float = 2.0
    dist_gamma: float = 2.0
    ta: str | None = None
    ta_epochs: int | None = None


@dataclass(frozen=True)
class HintOptions:
    """Hint (FitNets) methods.

    Attributes:
        weight: ``fitnet``'s hint weight (the benchmark's 100).
        stage1_epochs: ``fitnet2``'s hint pre-training epochs (the DIH paper's 40).
        last_weight: ``hint-last``'s weight of the MSE on the last stage (1).
    """

    weight: float = 100.0
    stage1_epochs: int = 40
    last_weight: float = 1.0


@dataclass(frozen=True)
class AttentionOptions:
    """Attention transfer.

    Attributes:
        beta: the weight of the attention loss (the benchmark's 1000, Zagoruyko & Komodakis' beta).
    """

    beta: float = 1000.0


@dataclass(frozen=True)
class RelationalOptions:
    """Relational methods: the weights of the community benchmark.

    Attributes:
        sp_weight: SP on the last stage (3000).
        pkt_weight: PKT on the penultimate feature (30000).
        rkd_weight: RKD (distance 25 + angle 50 inside the loss) on the penultimate feature (1).
        nst_weight: NST on the stage pairs (50).
        cc_weight: CC with a linear embedding of the student's penultimate feature (0.02).
    """

    sp_weight: float = 3000.0
    pkt_weight: float = 30000.0
    rkd_weight: float = 1.0
    nst_weight: float = 50.0
    cc_weight: float = 0.02


@dataclass(frozen=True)
class FeatureOptions:
    """Feature methods with trainable parts.

    Attributes:
        vid_weight: VID's weight per stage pair (1).
        ft_weight: FT's weight for ``FTLoss(variant="repdistiller", reduction="mean")`` (200).
        reviewkd_weight: ReviewKD's weight (1, its CIFAR-100 code and mdistiller).
        reviewkd_warmup: ReviewKD's warm-up epochs (20).
    """

    vid_weight: float = 1.0
    ft_weight: float = 200.0
    reviewkd_weight: float = 1.0
    reviewkd_warmup: float = 20.0


# CRD's settings are kdloss.ContrastMemory's defaults (RepDistiller's): read from there, not restated.
_MEMORY = inspect.signature(kdloss.ContrastMemory).parameters


@dataclass(frozen=True)
class ContrastiveOptions:
    """CRD (Tian, Krishnan & Isola, ICLR 2020), RepDistiller's settings.

    Attributes:
        n_data: rows of the memory banks: the size of the training split actually trained on.
        labels: that split's labels, for ``negatives="class"``.
        negatives: ``"class"`` (other classes' samples, RepDistiller's "exact") or ``"uniform"``.
        weight / ce_weight / kd_weight: the loss weights; ``None``: the preset's (``preset``).
        preset: the recipe whose weights apply (a key of
            :data:`~reference_trainers.methods.contrastive.CRD_PRESETS`).
        feat_dim: the embedding width (128, :class:`kdloss.ContrastMemory`'s default, as the three below).
        n_negatives: ``K`` negatives per sample (16384); clamped below ``n_data``, with a message.
        temperature: the NCE temperature (0.07).
        momentum: the banks' momentum (0.5).
    """

    n_data: int | None = None
    labels: Tensor | None = field(default=None, compare=False, repr=False)
    negatives: Literal["class", "uniform"] = "class"
    weight: float | None = None
    ce_weight: float | None = None
    kd_weight: float | None = None
    preset: str | None = None
    feat_dim: int = _MEMORY["feat_dim"].default
    n_negatives: int = _MEMORY["n_negatives"].default
    temperature: float = _MEMORY["temperature"].default
    momentum: float = _MEMORY["momentum"].default


@dataclass(frozen=True)
class CohortOptions:
    """Methods over intermediate heads or exits.

    Attributes:
        head_epochs: epochs of the teacher's head fine-tuning (Adam 1e-3; the DIH authors' 20).
        mhkd_head_weight: MHKD's weight of each intermediate head pair (the DIH authors' 0.5; the
            final pair weighs 1).
        tofd_beta / tofd_gamma: TOFD's feature and orthogonality weights (0.05, 1e-3).
    """

    head_epochs: int = 20
    mhkd_head_weight: float = 0.5
    tofd_beta: float = 0.05
    tofd_gamma: float = 1e-3


@dataclass(frozen=True)
class FusedLinearOptions:
    """The language-model methods (:mod:`~reference_trainers.methods.fused_linear`, the ``lm-distil`` recipe).

    Attributes:
        temperature: the KD temperature (1).
        kd_weight: the KD term's weight; cross-entropy gets ``1 - kd_weight`` (0.5).
        jsd_weight: the teacher's weight in the JSD mixture of ``kd-jsd`` (0.5).
        topk: the teacher's classes kept per token for ``kd-topk`` (16).
    """

    temperature: float = 1.0
    kd_weight: float = 0.5
    jsd_weight: float = 0.5
    topk: int = 16
