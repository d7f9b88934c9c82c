"""The CIFAR recipes' AB, FT and MHKD against the reference implementations' formulas (float64 where it counts).

- ``ab``: RepDistiller's ``ABLoss`` divides each stage's summed criterion by the batch size and
  then by 1000, times 3, with stage weights ``2^(i - n + 1)``;
- ``ft``: RepDistiller's ``FactorTransfer`` (channel mean of ``factor^2``, L1, mean) with weight 200
  and its ``Paraphraser`` without BatchNorm;
- ``mhkd``: the DIH authors' MHKD weighs each intermediate head pair 0.5 and the final pair 1.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kdloss
from reference_trainers.engine import DistillStep
from reference_trainers.methods import (
    CohortOptions,
    FeatureLossStep,
    FTPretrainStep,
    HeadsStep,
    MethodSetup,
    get_method,
)
from reference_trainers.models import build_model
from tests.naive import feature as naive_feature

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one torch thread (tests/conftest.py)


class _Phases:
    """A ``train_phase`` that builds each phase's step without training it and keeps it."""

    def __init__(self) -> None:
        self.steps: dict[str, tuple[DistillStep, nn.Module | None]] = {}

    def __call__(
        self, name: str, build: Callable[[], DistillStep], t_side: nn.Module | None, epochs: int, kind: str
    ) -> DistillStep:
        step = build()
        self.steps[name] = (step, t_side)
        return step


def _setup(phases: _Phases, teacher: str = "resnet14") -> MethodSetup:
    torch.manual_seed(0)
    model = build_model(teacher, 10).eval()
    return MethodSetup("resnet8", teacher, model, 10, 4.0, 1.0, 0.9, train_phase=phases)


def _ab_reference(s: Tensor, t: Tensor, margin: float = 1.0) -> Tensor:
    """RepDistiller's criterion_alternative_l2, summed over the whole stage map."""
    return (
        (s + margin) ** 2 * ((s > -margin) & (t <= 0)).to(s.dtype)
        + (s - margin) ** 2 * ((s <= margin) & (t > 0)).to(s.dtype)
    ).sum()


def test_ab_init_phase_scales_as_repdistiller() -> None:
    """sum_i 2^(i-n+1) * criterion_i / B / 1000 * 3: the recipe's init loss equals RepDistiller's ABLoss."""
    phases = _Phases()
    get_method("ab").make(_setup(phases))
    step, t_side = phases.steps["ab-init"]
    assert isinstance(step, FeatureLossStep)
    assert t_side is not None
    step.train()
    x, y = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 3])
    teacher = t_side(x)
    out = step(x, y, teacher)
    feats = step.feats()
    n = len(feats)
    assert n == 3
    with torch.no_grad():
        ref = sum(
            2.0 ** (i - n + 1) * _ab_reference(conn(f).double(), teacher[f"pre{i}"].double()) / x.shape[0] / 1000 * 3
            for i, (f, conn) in enumerate(zip(feats, step.parts, strict=True))
        )
    assert isinstance(ref, Tensor)
    torch.testing.assert_close(out.total.double(), ref, rtol=1e-5, atol=1e-8)
    assert set(out.parts) == {"ab", "total"}  # no CE in the init phase


def test_ft_recipe_uses_repdistillers_factor_transfer_and_paraphraser() -> None:
    phases = _Phases()
    built = get_method("ft").make(_setup(phases, teacher="resnet8x4"))
    pre, _ = phases.steps["ft-paraphraser"]
    assert isinstance(pre, FTPretrainStep)
    para = pre.paraphraser
    assert isinstance(para, kdloss.FTParaphraser)
    assert not para.batch_norm  # RepDistiller's Paraphraser(use_bn=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in para.modules())
    step = built.build().train()
    assert isinstance(step, FeatureLossStep)
    assert built.teacher is not None
    translator = step.parts
    assert isinstance(translator, kdloss.FTTranslator)
    assert any(isinstance(m, nn.BatchNorm2d) for m in translator.modules())  # RepDistiller's Translator has BN
    x, y = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2)), torch.tensor([0, 1, 2, 3])
    teacher = built.teacher(x)
    out = step(x, y, teacher)
    (f_s,) = step.feats()
    with torch.no_grad():
        factor_s = translator(f_s)
        ft = naive_feature.ft_repdistiller(factor_s.double(), teacher["factor"].double())
        ce = F.cross_entropy(step.student(x).double(), y)
    torch.testing.assert_close(out.parts["ft"].double(), ft, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(out.total.double(), ce + 200.0 * ft, rtol=1e-5, atol=1e-6)


def test_mhkd_recipe_weighs_head_pairs_half_and_the_final_pair_one() -> None:
    torch.manual_seed(0)
    teacher = build_model("resnet14", 10).eval()
    batches = [(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))]
    setup = MethodSetup(
        "resnet8", "resnet14", teacher, 10, 4.0, 1.0, 0.9, cohort=CohortOptions(head_epochs=1), train_batches=batches
    )
    built = get_method("mhkd").make(setup)
    step = built.build()
    assert isinstance(step, HeadsStep)
    loss = step.loss
    assert isinstance(loss, kdloss.MultiHeadKDLoss)
    k = len(step.heads.paths)
    assert k >= 1
    assert loss.weights == [0.5] * k + [1.0]
