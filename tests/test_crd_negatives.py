"""CRD's negatives must come from the other rows of the bank: K < n_data, checked up front.

``CRDLoss`` refuses ``n_negatives >= n_data`` with a message that names both and proposes a K;
the CIFAR recipes clamp a too-large ``--crd-nce-k`` to ``n_data - 1`` and say so in the log.
"""

from __future__ import annotations

import pytest
import torch

import kdloss
from kdloss.losses.contrastive import check_negatives_fit
from reference_trainers.methods import ContrastiveOptions, MethodSetup, get_method
from reference_trainers.models import build_model


def test_crdloss_refuses_more_negatives_than_rows() -> None:
    with pytest.raises(ValueError, match=r"n_negatives must be smaller than n_data \(the dataset size, 5000\): got "
                       r"n_negatives=16384; .* Choose at most 4999, e\.g\. about n_data // 3 = 1666"):  # fmt: skip
        kdloss.CRDLoss(8, 16, n_data=5000)  # the default K = 16384
    with pytest.raises(ValueError, match=r"got n_negatives=40; each sample's negatives come from the other 39 rows"):
        kdloss.CRDLoss(8, 16, n_data=40, feat_dim=8, n_negatives=40)
    crd = kdloss.CRDLoss(8, 16, n_data=40, feat_dim=8, n_negatives=39)  # the largest K that fits
    assert crd.memory.n_negatives == 39
    with pytest.raises(ValueError, match=r"n_negatives must be a positive int"):
        check_negatives_fit(0, 10)


def test_recipe_clamps_nce_k_to_the_training_split_and_logs_it() -> None:
    torch.manual_seed(0)
    teacher = build_model("resnet8", 10).eval()
    lines: list[str] = []
    options = ContrastiveOptions(n_data=12, n_negatives=16384, negatives="uniform")
    setup = MethodSetup("resnet8", "resnet8", teacher, 10, 4.0, 1.0, 0.9, contrastive=options, log=lines.append)
    step = get_method("crd").make(setup).build()
    crd = next(m for m in step.modules() if isinstance(m, kdloss.CRDLoss))
    assert crd.memory.n_negatives == 11
    assert lines == [
        "CRD: --crd-nce-k 16384 is not smaller than the 12 training images; using 11 negatives per sample "
        "(results are not comparable with K = 16384)"
    ]
