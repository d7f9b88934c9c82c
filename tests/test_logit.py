"""DKD and DIST: reference values/gradients, gradcheck, invariants, numerics, errors, modules."""

from __future__ import annotations

import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdloss import DISTLoss, DKDLoss, ShapeError
from kdloss.functional import dist_loss, dkd_loss, dkd_warmup_factor, soft_kl
from tests.helpers import (
    F64,
    assert_finite_with_grad,
    assert_matches_reference,
    assert_teacher_detached,
    leaf,
)
from tests.naive import logit as naive

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)


def _labels(b: int, c: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, c, (b,), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ DKD


@pytest.mark.parametrize(("b", "c"), [(4, 5), (3, 2), (1, 10)])
@pytest.mark.parametrize(("alpha", "beta", "temperature"), [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0), (1.0, 0.0, 2.5)])
def test_dkd_matches_reference(b: int, c: int, alpha: float, beta: float, temperature: float) -> None:
    s, t, y = leaf(b, c, seed=1, scale=3.0), leaf(b, c, seed=2, scale=3.0), _labels(b, c)
    assert_matches_reference(
        lambda s, t: dkd_loss(s, t, y, alpha=alpha, beta=beta, temperature=temperature),
        lambda s, t: naive.dkd(s, t, y, alpha, beta, temperature),
        [s, t],
        [s],
    )


def test_dkd_equals_mdistiller() -> None:
    s, t, y = leaf(8, 10, seed=1, scale=3.0), leaf(8, 10, seed=2, scale=3.0), _labels(8, 10)
    assert_matches_reference(
        lambda s, t: dkd_loss(s, t, y), lambda s, t: naive.dkd_mdistiller(s, t, y, 1.0, 8.0, 4.0), [s, t], [s]
    )


def test_dkd_reductions() -> None:
    s, t, y = leaf(6, 7, seed=3), leaf(6, 7, seed=4), _labels(6, 7)
    none = dkd_loss(s, t, y, reduction="none")
    assert none.shape == (6,)
    torch.testing.assert_close(dkd_loss(s, t, y, reduction="sum"), none.sum())
    torch.testing.assert_close(dkd_loss(s, t, y, reduction="batchmean"), none.mean())
    torch.testing.assert_close(dkd_loss(s, t, y, reduction="mean"), none.mean())


def test_dkd_gradcheck() -> None:
    s, t, y = leaf(3, 4, seed=5), leaf(3, 4, seed=6), _labels(3, 4)
    assert torch.autograd.gradcheck(lambda s: dkd_loss(s, t, y, reduction="none"), (s,))
    s2, t2, y2 = leaf(2, 2, seed=7), leaf(2, 2, seed=8), _labels(2, 2)
    assert torch.autograd.gradcheck(lambda s: dkd_loss(s, t2, y2), (s2,))


def test_dkd_teacher_detached() -> None:
    y = _labels(3, 5)
    assert_teacher_detached(lambda s, t: dkd_loss(s, t, y), leaf(3, 5), leaf(3, 5, seed=1))


logits_pairs = st.integers(min_value=2, max_value=6).flatmap(
    lambda c: st.tuples(st.just(c), st.integers(min_value=1, max_value=4), st.integers(min_value=0, max_value=10_000))
)


@SETTINGS
@given(logits_pairs, st.floats(min_value=0.5, max_value=8.0))
def test_dkd_decomposes_hinton_kd(case: tuple[int, int, int], temperature: float) -> None:
    """KD = TCKD + (1 - p_y^t) NCKD per sample (the paper's eq. 3), so DKD with beta = 1 - p_y is KD."""
    c, b, seed = case
    s, t, y = leaf(b, c, seed=seed, scale=3.0), leaf(b, c, seed=seed + 1, scale=3.0), _labels(b, c, seed)
    tckd = dkd_loss(s, t, y, alpha=1.0, beta=0.0, temperature=temperature, reduction="none")
    nckd = dkd_loss(s, t, y, alpha=0.0, beta=1.0, temperature=temperature, reduction="none")
    p_y = torch.softmax(t / temperature, dim=1).gather(1, y[:, None]).squeeze(1)
    kd = soft_kl(s, t, temperature=temperature, reduction="none")
    torch.testing.assert_close(tckd + (1 - p_y) * nckd, kd, atol=1e-9, rtol=1e-9)
    assert (tckd >= -1e-12).all()
    assert (nckd >= -1e-12).all()


@SETTINGS
@given(logits_pairs)
def test_dkd_is_zero_for_identical_logits(case: tuple[int, int, int]) -> None:
    c, b, seed = case
    t = leaf(b, c, seed=seed, scale=5.0)
    assert dkd_loss(t, t.detach(), _labels(b, c, seed)).abs().item() < 1e-12


def test_dkd_two_classes_is_tckd_only_and_safe() -> None:
    s = torch.tensor([[100.0, -100.0], [-30.0, 30.0], [0.0, 0.0]], dtype=F64, requires_grad=True)
    t = torch.tensor([[-100.0, 100.0], [5.0, 5.0], [50.0, -50.0]], dtype=F64)
    y = torch.tensor([0, 1, 1])
    nckd = dkd_loss(s, t, y, alpha=0.0, beta=1.0, reduction="none")
    assert torch.equal(nckd, torch.zeros(3, dtype=F64))
    loss = dkd_loss(s, t, y)
    assert_finite_with_grad(loss, s)
    # TCKD alone for 2 classes equals Hinton's KD (the binary distribution is the distribution)
    torch.testing.assert_close(
        dkd_loss(s, t, y, alpha=1.0, beta=0.0, reduction="none"), soft_kl(s, t, temperature=4.0, reduction="none")
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dkd_low_precision_and_extreme(dtype: torch.dtype) -> None:
    s = (torch.randn(4, 10) * 100).to(dtype).requires_grad_(True)
    t = (torch.randn(4, 10) * 100).to(dtype)
    loss = dkd_loss(s, t, _labels(4, 10))
    assert loss.dtype == torch.float32
    assert_finite_with_grad(loss, s)
    ref = dkd_loss(s.detach().double(), t.double(), _labels(4, 10))
    torch.testing.assert_close(loss.double(), ref, atol=1e-4, rtol=1e-4)


def test_dkd_warmup() -> None:
    s, t, y = leaf(2, 5), leaf(2, 5, seed=1), _labels(2, 5)
    full = dkd_loss(s, t, y)
    torch.testing.assert_close(dkd_loss(s, t, y, epoch=5, warmup_epochs=20), 0.25 * full)
    torch.testing.assert_close(dkd_loss(s, t, y, epoch=40, warmup_epochs=20), full)
    assert dkd_warmup_factor(0, 20) == 0.0
    assert DKDLoss(warmup_epochs=10)(s, t, y, epoch=5).item() == pytest.approx(0.5 * full.item())


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"s": torch.zeros(2, 3), "t": torch.zeros(2, 4)}, ShapeError, r"same shape.*\(2, 3\) and \(2, 4\)"),
        ({"s": torch.zeros(2, 3, 1), "t": torch.zeros(2, 3, 1)}, ShapeError, r"\(B, C\) logits"),
        ({"s": torch.zeros(2, 1), "t": torch.zeros(2, 1), "y": torch.zeros(2, dtype=torch.long)}, ShapeError, "2 cl"),
        ({"s": torch.zeros(2, 3, dtype=torch.long)}, TypeError, "floating-point"),
        ({"y": torch.zeros(2)}, TypeError, "labels must be an integer"),
        ({"y": torch.zeros(3, dtype=torch.long)}, ShapeError, r"labels must have shape \(B,\) = \(2,\)"),
        ({"y": torch.tensor([0, 3])}, ValueError, r"labels must lie in \[0, 3\).*\[0, 3\]"),
        ({"y": torch.tensor([-1, 0])}, ValueError, r"labels must lie in"),
        ({"temperature": 0.0}, ValueError, "temperature must be a finite number > 0, got 0.0"),
        ({"alpha": -1.0}, ValueError, "alpha must be a finite number >= 0, got -1.0"),
        ({"beta": float("nan")}, ValueError, "beta must be"),
        ({"reduction": "avg"}, ValueError, "reduction must be one of"),
        ({"warmup_epochs": 5}, ValueError, "epoch is required when warmup_epochs > 0"),
        ({"warmup_epochs": -1}, ValueError, "warmup_epochs must be a finite number >= 0"),
    ],
)
def test_dkd_errors(kwargs: dict[str, object], error: type[Exception], match: str) -> None:
    s = kwargs.pop("s", torch.zeros(2, 3))
    t = kwargs.pop("t", s)
    y = kwargs.pop("y", torch.tensor([0, 1]))
    with pytest.raises(error, match=match):
        dkd_loss(s, t, y, **kwargs)  # type: ignore[arg-type]


def test_dkd_module() -> None:
    s, t, y = leaf(3, 6), leaf(3, 6, seed=1), _labels(3, 6)
    m = DKDLoss(alpha=0.5, beta=2.0, temperature=2.0, reduction="sum")
    assert torch.equal(m(s, t, y), dkd_loss(s, t, y, alpha=0.5, beta=2.0, temperature=2.0, reduction="sum"))
    assert repr(m) == "DKDLoss(alpha=0.5, beta=2.0, temperature=2.0, reduction='sum')"
    assert not list(m.parameters())
    assert not list(m.buffers())
    assert repr(pickle.loads(pickle.dumps(m))) == repr(m)
    with pytest.raises(ValueError, match="temperature"):
        DKDLoss(temperature=-1.0)
    with pytest.raises(ValueError, match="reduction"):
        DKDLoss(reduction="bad")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ DIST


@pytest.mark.parametrize(("b", "c"), [(4, 5), (2, 2), (6, 3)])
@pytest.mark.parametrize(("beta", "gamma", "temperature"), [(1.0, 1.0, 1.0), (2.0, 0.5, 4.0)])
def test_dist_matches_reference(b: int, c: int, beta: float, gamma: float, temperature: float) -> None:
    s, t = leaf(b, c, seed=1, scale=2.0), leaf(b, c, seed=2, scale=2.0)
    assert_matches_reference(
        lambda s, t: dist_loss(s, t, beta=beta, gamma=gamma, temperature=temperature, eps=0.0),
        lambda s, t: naive.dist(s, t, beta, gamma, temperature),
        [s, t],
        [s],
    )


def test_dist_default_eps_is_close_to_paper() -> None:
    s, t = leaf(8, 10, seed=1), leaf(8, 10, seed=2)
    torch.testing.assert_close(dist_loss(s, t), naive.dist(s, t, 1.0, 1.0, 1.0), atol=1e-5, rtol=1e-5)


def test_dist_constant_rows_with_eps_zero_are_finite() -> None:
    """eps=0 with a constant softmax row (equal logits) gave 0/0 = NaN in the value and the gradient."""
    s = torch.zeros(4, 5, requires_grad=True)
    t = torch.zeros(4, 5)
    loss = dist_loss(s, t, eps=0.0)
    loss.backward()
    assert torch.isfinite(loss)
    assert s.grad is not None
    assert torch.isfinite(s.grad).all()
    # the value eps > 0 gives for the same input: correlation 0, so 1 + 1
    torch.testing.assert_close(loss, dist_loss(s, t), atol=1e-6, rtol=0)
    # rows that are not constant keep the exact Pearson correlation
    a, b = leaf(6, 5, seed=5), leaf(6, 5, seed=6)
    torch.testing.assert_close(dist_loss(a, b, eps=0.0), naive.dist(a, b, 1.0, 1.0, 1.0), atol=1e-6, rtol=1e-6)


def test_dist_gradcheck_and_detached() -> None:
    s, t = leaf(3, 4, seed=3), leaf(3, 4, seed=4)
    assert torch.autograd.gradcheck(lambda s: dist_loss(s, t, temperature=2.0), (s,))
    assert_teacher_detached(dist_loss, s, t)


@SETTINGS
@given(st.integers(2, 5), st.integers(2, 5), st.integers(0, 10_000), st.floats(-5.0, 5.0))
def test_dist_invariants(b: int, c: int, seed: int, shift: float) -> None:
    s, t = leaf(b, c, seed=seed, scale=2.0), leaf(b, c, seed=seed + 1, scale=2.0)
    base = dist_loss(s, t)
    # a per-sample logit shift does not change the softmax
    torch.testing.assert_close(dist_loss(s + shift, t), base)
    # permuting classes (jointly) and samples (jointly) permutes rows/columns of both relations
    pc = torch.randperm(c, generator=torch.Generator().manual_seed(seed))
    pb = torch.randperm(b, generator=torch.Generator().manual_seed(seed + 1))
    torch.testing.assert_close(dist_loss(s[pb][:, pc], t[pb][:, pc]), base)
    assert dist_loss(t, t.detach(), eps=0.0).abs().item() < 1e-9
    # Pearson distance lies in [0, 2]: the loss lies in [0, 2 T^2 (beta + gamma)]
    assert -1e-12 <= base.item() <= 4.0 + 1e-12


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dist_low_precision_and_extreme(dtype: torch.dtype) -> None:
    s = (torch.randn(4, 10) * 100).to(dtype).requires_grad_(True)
    t = (torch.randn(4, 10) * 100).to(dtype)
    loss = dist_loss(s, t, temperature=4.0)
    assert loss.dtype == torch.float32
    assert_finite_with_grad(loss, s)
    # uniform rows (zero variance) stay finite thanks to eps
    z = torch.zeros(3, 4, requires_grad=True)
    assert_finite_with_grad(dist_loss(z, torch.zeros(3, 4)), z)


@pytest.mark.parametrize(
    ("s", "t", "kwargs", "error", "match"),
    [
        (torch.zeros(1, 3), torch.zeros(1, 3), {}, ShapeError, r"at least 2 samples.*\(1, 3\)"),
        (torch.zeros(2, 3), torch.zeros(3, 3), {}, ShapeError, r"batch size 2 vs 3"),
        (torch.zeros(4), torch.zeros(4), {}, ShapeError, r"\(B, C\)"),
        (torch.zeros(2, 3), torch.zeros(2, 3), {"temperature": 0}, ValueError, "temperature"),
        (torch.zeros(2, 3), torch.zeros(2, 3), {"gamma": -1.0}, ValueError, "gamma must be"),
        (torch.zeros(2, 3), torch.zeros(2, 3), {"eps": -1.0}, ValueError, "eps must be"),
        (torch.zeros(2, 3, dtype=torch.int32), torch.zeros(2, 3), {}, TypeError, "student_logits must be a floating"),
    ],
)
def test_dist_errors(
    s: torch.Tensor, t: torch.Tensor, kwargs: dict[str, float], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        dist_loss(s, t, **kwargs)


def test_dist_module() -> None:
    s, t = leaf(3, 6), leaf(3, 6, seed=1)
    m = DISTLoss(beta=2.0, gamma=2.0, temperature=4.0)
    assert torch.equal(m(s, t), dist_loss(s, t, beta=2.0, gamma=2.0, temperature=4.0))
    assert repr(m) == "DISTLoss(beta=2.0, gamma=2.0, temperature=4.0, eps=1e-08)"
    assert not list(m.parameters())
    with pytest.raises(ValueError, match="beta"):
        DISTLoss(beta=-2.0)


def test_dkd_masked_classes_and_empty_batch() -> None:
    inf = float("-inf")
    s = torch.tensor([[1.0, inf, 0.0, 2.0], [0.5, 1.0, inf, inf]], dtype=F64, requires_grad=True)
    t = torch.tensor([[0.0, inf, 1.0, 1.0], [1.0, 0.0, inf, inf]], dtype=F64)
    y = torch.tensor([0, 1])
    loss = dkd_loss(s, t, y, reduction="none")
    assert_finite_with_grad(loss, s)
    # equal to DKD on the logits with the masked classes removed
    torch.testing.assert_close(loss[0], dkd_loss(s[:1, [0, 2, 3]], t[:1, [0, 2, 3]], y[:1]))
    torch.testing.assert_close(loss[1], dkd_loss(s[1:, :2], t[1:, :2], y[1:]))
    empty = torch.zeros(0, 5, requires_grad=True)
    out = dkd_loss(empty, empty.detach(), torch.zeros(0, dtype=torch.long))
    assert out.item() == 0.0
    assert dkd_loss(empty, empty.detach(), torch.zeros(0, dtype=torch.long), reduction="none").shape == (0,)
