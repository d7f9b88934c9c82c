"""VID, AB, FT, ReviewKD (HCL): reference values/gradients, gradcheck, numerics, errors, modules, trainable parts."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kdloss import (
    ABConnector,
    ABLoss,
    FTLoss,
    FTParaphraser,
    FTTranslator,
    HCLLoss,
    ReviewKDFusion,
    ShapeError,
    VIDLoss,
    VIDRegressor,
    adapter_parameters,
)
from kdloss.functional import ab_loss, ft_loss, hcl_loss, vid_loss
from tests.helpers import (
    F64,
    assert_finite_with_grad,
    assert_matches_reference,
    assert_teacher_detached,
    leaf,
)
from tests.naive import feature as naive

SETTINGS = settings(max_examples=15, deadline=None, derandomize=True)
seeds = st.integers(0, 10_000)

# ------------------------------------------------------------------------------------------------ VID


def test_vid_matches_reference_and_reductions() -> None:
    mean, t = leaf(2, 3, 2, 2, seed=1), leaf(2, 3, 2, 2, seed=2)
    var = (torch.rand(3, generator=torch.Generator().manual_seed(0), dtype=F64) + 0.5).requires_grad_(True)
    assert_matches_reference(lambda m, t, v: vid_loss(m, t, v), naive.vid, [mean, t, var], [mean, var])
    elems = vid_loss(mean, t, var, reduction="none")
    assert elems.shape == (2, 3, 2, 2)
    torch.testing.assert_close(vid_loss(mean, t, var, reduction="sum"), elems.sum())
    torch.testing.assert_close(vid_loss(mean, t, var, reduction="batchmean"), elems.sum() / 2)
    assert torch.autograd.gradcheck(lambda m, v: vid_loss(m, t, v, reduction="none"), (mean, var))
    assert_teacher_detached(lambda m, t: vid_loss(m, t, var), mean, t)


@SETTINGS
@given(seeds, st.floats(0.1, 10.0))
def test_vid_minimised_by_teacher_and_its_variance(seed: int, var: float) -> None:
    """The Gaussian NLL is minimal at mean = t, and over sigma^2 at the mean squared error."""
    t = leaf(2, 1, 3, 3, seed=seed)
    mean = leaf(2, 1, 3, 3, seed=seed + 1)
    v = torch.tensor([var], dtype=F64)
    assert vid_loss(t.detach(), t, v) <= vid_loss(mean, t, v) + 1e-12
    best = (t - mean).square().mean().reshape(1)
    assert vid_loss(mean, t, best) <= vid_loss(mean, t, v) + 1e-12


def test_vid_regressor() -> None:
    reg = VIDRegressor(4, 8, 6, init_variance=5.0)
    mean, var = reg(torch.randn(2, 4, 3, 3))
    assert mean.shape == (2, 6, 3, 3)
    torch.testing.assert_close(var, torch.full((6,), 5.0))
    loss = vid_loss(mean, torch.randn(2, 6, 3, 3), var)
    loss.backward()
    assert reg.log_scale.grad is not None
    assert all(p.grad is not None for p in reg.parameters())
    assert len(adapter_parameters(reg)) == len(list(reg.parameters()))
    with pytest.raises(ShapeError, match=r"VIDRegressor expects student_feature of shape \(B, 4, H, W\)"):
        reg(torch.randn(2, 5, 3, 3))
    with pytest.raises(ValueError, match="init_variance must be > eps"):
        VIDRegressor(4, 8, 6, init_variance=1e-6)  # > 0 but below the floor eps=1e-5
    with pytest.raises(ValueError, match="mid_channels must be a positive int"):
        VIDRegressor(4, 0, 6)


# ------------------------------------------------------------------------------------------------ AB


@pytest.mark.parametrize("margin", [1.0, 0.5, 2.0])
def test_ab_matches_reference(margin: float) -> None:
    s, t = leaf(3, 4, 2, 2, seed=1, scale=2.0), leaf(3, 4, 2, 2, seed=2)
    assert_matches_reference(
        lambda s, t: ab_loss(s, t, margin=margin), lambda s, t: naive.ab(s, t, margin), [s, t], [s]
    )


def test_ab_reductions_gradcheck_and_zero_region() -> None:
    s, t = leaf(2, 3, 2, 2, seed=1, scale=3.0), leaf(2, 3, 2, 2, seed=2)
    elems = ab_loss(s, t, reduction="none")
    assert elems.shape == s.shape
    torch.testing.assert_close(ab_loss(s, t, reduction="mean"), elems.mean())
    torch.testing.assert_close(ab_loss(s, t, reduction="sum"), elems.sum())
    assert torch.autograd.gradcheck(lambda s: ab_loss(s, t, reduction="none"), (s,))
    # beyond the margin on the teacher's side: no loss and no gradient
    sure = (torch.sign(t.detach()) * 5.0).requires_grad_(True)
    assert ab_loss(sure, t).item() == 0.0
    assert_teacher_detached(ab_loss, s, t)


def test_ab_connector() -> None:
    con = ABConnector(3, 5)
    out = con(torch.randn(2, 3, 4, 4))
    assert out.shape == (2, 5, 4, 4)
    ab_loss(out, torch.randn(2, 5, 4, 4)).backward()
    assert con.conv.weight.grad is not None
    with pytest.raises(ShapeError, match="ABConnector expects student_preact"):
        con(torch.randn(2, 4, 4, 4))


# ------------------------------------------------------------------------------------------------ FT


@pytest.mark.parametrize("p", [1, 2])
def test_ft_matches_reference(p: int) -> None:
    s, t = leaf(3, 2, 2, 2, seed=1), leaf(3, 2, 2, 2, seed=2)
    assert_matches_reference(lambda s, t: ft_loss(s, t, p=p), lambda s, t: naive.ft(s, t, p), [s, t], [s])


def test_ft_reductions_gradcheck_and_invariance() -> None:
    s, t = leaf(3, 4, seed=1), leaf(3, 4, seed=2)
    per = ft_loss(s, t, reduction="none")
    assert per.shape == (3,)
    torch.testing.assert_close(ft_loss(s, t, reduction="mean"), per.sum() / 12)  # RepDistiller's element mean
    for p in (1, 2):
        assert torch.autograd.gradcheck(lambda s, p=p: ft_loss(s, t, p=p, reduction="none"), (s,))
    scale = torch.tensor([[0.5], [2.0], [7.0]], dtype=F64)
    torch.testing.assert_close(ft_loss(scale * s, t, reduction="none"), per)
    same = t.detach().clone().requires_grad_(True)
    assert_finite_with_grad(ft_loss(same, t, p=2), same)
    assert_teacher_detached(ft_loss, s, t)


@pytest.mark.parametrize("p2", [1, 2])
@pytest.mark.parametrize(
    ("s_shape", "t_shape"), [((3, 4, 4, 4), (3, 2, 4, 4)), ((2, 3, 8, 8), (2, 5, 4, 4)), ((2, 3, 2, 2), (2, 4, 4, 4))]
)
def test_ft_repdistiller_variant_matches_reference(s_shape: tuple[int, ...], t_shape: tuple[int, ...], p2: int) -> None:
    """variant="repdistiller" is RepDistiller's FactorTransfer (factor = normalised channel mean of F^2,
    a length-HW map; the larger map pooled; mean of |diff| or diff^2 over B x HW), float64, values and grads."""
    s, t = leaf(*s_shape, seed=11), leaf(*t_shape, seed=12)
    assert_matches_reference(
        lambda s, t: ft_loss(s, t, p=p2, variant="repdistiller", reduction="mean"),
        lambda s, t: naive.ft_repdistiller(s, t, p2=p2),
        [s, t],
        [s],
    )
    assert_matches_reference(
        lambda s, t: ft_loss(s.abs(), t.abs(), variant="repdistiller", factor_p=3.0, reduction="mean"),
        lambda s, t: naive.ft_repdistiller(s.abs(), t.abs(), p1=3.0),
        [s, t],
        [s],
    )
    m = FTLoss(variant="repdistiller", reduction="mean")
    torch.testing.assert_close(m(s, t), naive.ft_repdistiller(s, t))
    assert_teacher_detached(lambda s, t: ft_loss(s, t, variant="repdistiller"), s, t)


@pytest.mark.parametrize(("s_shape", "t_shape"), [((2, 3, 6, 10), (2, 5, 3, 5)), ((2, 3, 8, 4), (2, 5, 4, 8))])
def test_ft_repdistiller_variant_non_square(s_shape: tuple[int, ...], t_shape: tuple[int, ...]) -> None:
    s, t = leaf(*s_shape, seed=13), leaf(*t_shape, seed=14)
    assert_matches_reference(
        lambda s, t: ft_loss(s, t, variant="repdistiller", reduction="mean"),
        naive.ft_repdistiller_any_size,
        [s, t],
        [s],
    )


def test_ft_paper_mean_is_not_repdistiller() -> None:
    """reduction="mean" of the paper variant (the whole factor normalised) is a different loss from
    RepDistiller's FactorTransfer: the docs no longer say they are equal."""
    s, t = leaf(2, 4, 4, 4, seed=15), leaf(2, 4, 4, 4, seed=16)
    paper_mean = ft_loss(s, t, reduction="mean")
    rep = naive.ft_repdistiller(s, t)
    assert (paper_mean - rep).abs() > 0.05 * rep
    for obj in (ft_loss, FTLoss):
        assert "RepDistiller averages" not in (obj.__doc__ or "")


def test_ft_variant_errors_and_repr() -> None:
    with pytest.raises(ValueError, match=r"factor_p is the channel exponent of variant='repdistiller'"):
        ft_loss(torch.zeros(2, 3), torch.zeros(2, 3), factor_p=2.0)
    with pytest.raises(ValueError, match=r"factor_p is the channel exponent"):
        FTLoss(factor_p=2.0)
    with pytest.raises(ValueError, match=r"variant must be one of 'paper', 'repdistiller', got 'x'"):
        ft_loss(torch.zeros(2, 3), torch.zeros(2, 3), variant="x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"variant must be one of 'paper', 'repdistiller', got 'x'"):
        FTLoss(variant="x")  # type: ignore[arg-type]
    with pytest.raises(ShapeError, match=r"needs student_factor as a \(B, K, H, W\) map, got shape \(2, 3\)"):
        ft_loss(torch.zeros(2, 3), torch.zeros(2, 3, 4, 4), variant="repdistiller")
    with pytest.raises(ShapeError, match=r"same batch size"):
        ft_loss(torch.zeros(2, 3, 4, 4), torch.zeros(3, 3, 4, 4), variant="repdistiller")
    with pytest.raises(ValueError, match=r"factor_p must be a finite number > 0, got 0"):
        FTLoss(variant="repdistiller", factor_p=0)
    assert (
        repr(FTLoss(variant="repdistiller"))
        == "FTLoss(p=1, reduction='batchmean', variant='repdistiller', factor_p=2.0)"
    )
    assert repr(FTLoss(variant="repdistiller", factor_p=4)) == (
        "FTLoss(p=1, reduction='batchmean', variant='repdistiller', factor_p=4.0)"
    )


def test_ft_paraphraser_batch_norm_option() -> None:
    """batch_norm=True (default) puts a BatchNorm after each of the six convolutions; batch_norm=False is
    RepDistiller's Paraphraser (use_bn=False): conv + LeakyReLU(0.1) only, same parameter shapes otherwise."""
    with_bn, without = FTParaphraser(6), FTParaphraser(6, batch_norm=False)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in with_bn.modules()) == 6
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in without.modules())
    convs = [m for m in without.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    assert [tuple(c.weight.shape) for c in convs] == [
        tuple(c.weight.shape) for c in with_bn.modules() if isinstance(c, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))
    ]
    assert all(c.bias is not None for c in convs)
    x = torch.randn(2, 6, 4, 4)
    factor, recon = without(x)
    c1, _, c2, _, c3, _ = without.encoder
    torch.testing.assert_close(factor, F.leaky_relu(c3(F.leaky_relu(c2(F.leaky_relu(c1(x), 0.1)), 0.1)), 0.1))
    assert recon.shape == x.shape
    assert "batch_norm=False" in repr(without)
    with pytest.raises(TypeError, match=r"batch_norm must be a bool, got int"):
        FTParaphraser(6, batch_norm=1)  # type: ignore[arg-type]


def test_ft_paraphraser_and_translator() -> None:
    para = FTParaphraser(6, rate=0.5)
    trans = FTTranslator(4, para.factor_channels)
    factor, recon = para(torch.randn(2, 6, 4, 4))
    assert factor.shape == (2, 3, 4, 4)
    assert recon.shape == (2, 6, 4, 4)
    loss = ft_loss(trans(torch.randn(2, 4, 4, 4)), factor)
    loss.backward()
    assert all(p.grad is not None for p in trans.parameters())
    assert all(p.grad is None for p in para.parameters())  # the teacher factor is detached
    with pytest.raises(ShapeError, match="FTTranslator expects student_feature"):
        trans(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"rate must be a finite number > 0, got 0\.0"):
        FTParaphraser(6, rate=0.0)
    # inf was accepted (a factor of round(inf) channels: OverflowError deep inside), a string gave
    # a bare comparison TypeError that did not name the argument
    with pytest.raises(ValueError, match=r"rate must be a finite number > 0, got inf"):
        FTParaphraser(6, rate=float("inf"))
    with pytest.raises(TypeError, match=r"rate must be a positive number, got str"):
        FTParaphraser(6, rate="0.5")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ HCL / ReviewKD


def test_hcl_matches_reference() -> None:
    s = [leaf(2, 3, 8, 8, seed=1), leaf(2, 4, 4, 4, seed=2), leaf(2, 2, 1, 1, seed=3)]
    t = [leaf(2, 3, 8, 8, seed=4), leaf(2, 4, 4, 4, seed=5), leaf(2, 2, 1, 1, seed=6)]
    assert_matches_reference(
        lambda *x: hcl_loss(list(x[:3]), list(x[3:])), lambda *x: naive.hcl(list(x[:3]), list(x[3:])), [*s, *t], s
    )
    small_s, small_t = leaf(1, 2, 4, 4, seed=7), leaf(1, 2, 4, 4, seed=8)
    assert torch.autograd.gradcheck(lambda x: hcl_loss(x, small_t), (small_s,))
    assert_teacher_detached(hcl_loss, s[0], t[0])
    # a single level reduces to the MSE
    torch.testing.assert_close(hcl_loss(s[0], t[0], levels=()), torch.nn.functional.mse_loss(s[0], t[0]))


def test_reviewkd_fusion() -> None:
    fusion = ReviewKDFusion([2, 4, 8], [3, 5, 7], mid_channels=4)
    feats = [torch.randn(2, 2, 8, 8), torch.randn(2, 4, 4, 4), torch.randn(2, 8, 2, 2)]
    outs = fusion(feats)
    assert [tuple(o.shape) for o in outs] == [(2, 3, 8, 8), (2, 5, 4, 4), (2, 7, 2, 2)]
    teacher = [torch.randn_like(o) for o in outs]
    hcl_loss(outs, teacher).backward()
    assert all(p.grad is not None for p in fusion.parameters())
    assert fusion.abfs[-1].att_conv is None  # the deepest stage has nothing to fuse with
    with pytest.raises(ValueError, match="expects 3 stage maps, got 2"):
        fusion(feats[:2])
    with pytest.raises(ShapeError, match=r"student_features\[1\] of shape \(B, 4, H, W\)"):
        fusion([feats[0], feats[0], feats[2]])
    with pytest.raises(ValueError, match="equally long"):
        ReviewKDFusion([2, 4], [3], mid_channels=4)


# ------------------------------------------------------------------------------------------------ all


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_and_extreme_inputs_are_finite(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    for scale in (1.0, 1e2):
        s = (scale * torch.randn(2, 3, 4, 4, generator=g)).to(dtype).requires_grad_(True)
        t = (scale * torch.randn(2, 3, 4, 4, generator=g)).to(dtype)
        var = torch.full((3,), 1e-3, dtype=dtype)
        for loss in (vid_loss(s, t, var), ab_loss(s, t), ft_loss(s, t), ft_loss(s, t, p=2), hcl_loss(s, t)):
            assert loss.dtype == torch.float32
            assert_finite_with_grad(loss, s)
    zeros = torch.zeros(2, 3, 4, 4, dtype=dtype, requires_grad=True)
    assert_finite_with_grad(ft_loss(zeros, zeros.detach()), zeros)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: vid_loss(torch.zeros(2, 3, 2), torch.zeros(2, 4, 2), torch.ones(3)), ShapeError, "same shape"),
        (lambda: vid_loss(torch.zeros(2, 3, 2), torch.zeros(2, 3, 2), torch.ones(4)), ShapeError, r"\(C,\) = \(3,\)"),
        (lambda: vid_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3), reduction="x"), ValueError, "reduct"),
        (lambda: vid_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3, dtype=torch.long)), TypeError, "varia"),
        (lambda: ab_loss(torch.zeros(2, 3), torch.zeros(2, 4)), ShapeError, "ABConnector"),
        (lambda: ab_loss(torch.zeros(2, 3), torch.zeros(2, 3), margin=0.0), ValueError, "margin must be"),
        (lambda: ab_loss(torch.zeros(3), torch.zeros(3)), ShapeError, "feature dimension"),
        (lambda: ft_loss(torch.zeros(2, 3), torch.zeros(2, 3), p=3), ValueError, "p must be 1 or 2, got 3"),
        (lambda: ft_loss(torch.zeros(2, 3), torch.zeros(3, 3)), ShapeError, "batch size 2 vs 3"),
        (lambda: hcl_loss([torch.zeros(2, 3, 4, 4)], []), ValueError, "must pair up, got 1 and 0"),
        (lambda: hcl_loss([], []), ValueError, "at least one"),
        (lambda: hcl_loss(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4)), ShapeError, r"\(B, C, H, W\)"),
        (lambda: hcl_loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 2, 2)), ShapeError, "same shape"),
        (lambda: hcl_loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4), levels=(0,)), ValueError, "levels"),
    ],
)
def test_errors(call: Callable[[], object], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        call()


def test_modules_equal_functions_and_repr() -> None:
    s, t = leaf(2, 3, 4, 4), leaf(2, 3, 4, 4, seed=1)
    var = torch.ones(3, dtype=F64)
    assert torch.equal(VIDLoss(reduction="sum")(s, t, var), vid_loss(s, t, var, reduction="sum"))
    assert torch.equal(ABLoss(margin=2.0)(s, t), ab_loss(s, t, margin=2.0))
    assert torch.equal(FTLoss(p=2)(s, t), ft_loss(s, t, p=2))
    assert torch.equal(HCLLoss(levels=(2,))(s, t), hcl_loss(s, t, levels=(2,)))
    assert repr(VIDLoss()) == "VIDLoss(reduction='mean')"
    assert repr(ABLoss()) == "ABLoss(margin=1.0, reduction='batchmean')"
    assert repr(FTLoss(reduction="mean")) == "FTLoss(p=1, reduction='mean', variant='paper')"
    assert repr(HCLLoss()) == "HCLLoss(levels=(4, 2, 1))"
    for m in (VIDLoss(), ABLoss(), FTLoss(), HCLLoss()):
        assert not list(m.parameters())
        assert not list(m.buffers())
    with pytest.raises(ValueError, match="margin"):
        ABLoss(margin=-1.0)
    with pytest.raises(ValueError, match="p must be 1 or 2"):
        FTLoss(p=0)
    with pytest.raises(ValueError, match="levels"):
        HCLLoss(levels=(-1,))


def test_empty_batch_gives_zero() -> None:
    m = torch.zeros(0, 3, 2, 2, requires_grad=True)
    for loss in (vid_loss(m, m.detach(), torch.ones(3)), ab_loss(m, m), ft_loss(m, m), hcl_loss(m, m)):
        assert loss.item() == 0.0


def test_vid_nonpositive_variance_raises_instead_of_nan() -> None:
    """A variance <= 0 gave log(<= 0) = NaN (or -inf) silently; VIDRegressor accepted eps/init_variance=inf."""
    t = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"variance must be > 0 in every channel, got minimum -1\.0"):
        vid_loss(t, t, torch.tensor([1.0, -1.0, 2.0]))
    with pytest.raises(ValueError, match=r"variance must be > 0 in every channel, got minimum 0\.0"):
        vid_loss(t, t, torch.tensor([1.0, 0.0, 2.0]))
    with pytest.raises(ValueError, match=r"init_variance must be a finite number > 0, got inf"):
        VIDRegressor(4, 8, 6, init_variance=float("inf"))
    with pytest.raises(ValueError, match=r"eps must be a finite number > 0, got nan"):
        VIDRegressor(4, 8, 6, eps=float("nan"))
