"""SP, CC, RKD, PKT, FSP, NST: reference values/gradients, gradcheck, invariants, numerics, errors, modules."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdloss import CCLoss, FSPLoss, NSTLoss, PKTLoss, RKDLoss, ShapeError, SPLoss
from kdloss.functional import cc_loss, fsp_loss, fsp_matrix, nst_loss, pkt_loss, rkd_loss, sp_loss
from tests.helpers import (
    F64,
    assert_finite_with_grad,
    assert_matches_reference,
    assert_teacher_detached,
    leaf,
)
from tests.naive import relational as naive

SETTINGS = settings(max_examples=15, deadline=None, derandomize=True)
seeds = st.integers(0, 10_000)


def _rotation(d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=F64))
    return q


# ------------------------------------------------------------------------------------------------ SP


@pytest.mark.parametrize(("s_shape", "t_shape"), [((4, 6), (4, 3)), ((3, 2, 3, 3), (3, 5, 2, 2)), ((2, 4), (2, 4))])
def test_sp_matches_reference(s_shape: tuple[int, ...], t_shape: tuple[int, ...]) -> None:
    s, t = leaf(*s_shape, seed=1), leaf(*t_shape, seed=2)
    assert_matches_reference(sp_loss, naive.sp, [s, t], [s])


def test_sp_sums_over_pairs_and_gradcheck() -> None:
    s1, s2, t1, t2 = leaf(3, 4), leaf(3, 2, 2, 2, seed=1), leaf(3, 5, seed=2), leaf(3, 3, seed=3)
    torch.testing.assert_close(sp_loss([s1, s2], [t1, t2]), naive.sp(s1, t1) + naive.sp(s2, t2))
    assert torch.autograd.gradcheck(lambda s: sp_loss(s, t1), (s1,))
    assert_teacher_detached(sp_loss, s1, t1)


@SETTINGS
@given(st.integers(2, 5), st.integers(2, 5), seeds, st.floats(0.1, 10.0))
def test_sp_invariant_to_scale_and_rotation(b: int, d: int, seed: int, scale: float) -> None:
    s, t = leaf(b, d, seed=seed), leaf(b, d + 1, seed=seed + 1)
    base = sp_loss(s, t)
    torch.testing.assert_close(sp_loss(scale * s @ _rotation(d, seed), t), base)
    torch.testing.assert_close(sp_loss(s, t * scale), base)
    perm = torch.randperm(b, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(sp_loss(s[perm], t[perm]), base)
    assert sp_loss(t, t.detach()).abs().item() < 1e-12


# ------------------------------------------------------------------------------------------------ CC


@pytest.mark.parametrize(("gamma", "order"), [(0.4, 2), (1.0, 1), (0.7, 4)])
def test_cc_matches_reference(gamma: float, order: int) -> None:
    s, t = leaf(4, 3, seed=1), leaf(4, 5, seed=2)
    assert_matches_reference(
        lambda s, t: cc_loss(s, t, gamma=gamma, order=order), lambda s, t: naive.cc(s, t, gamma, order), [s, t], [s]
    )


def test_cc_taylor_converges_to_rbf_and_repdistiller_variant() -> None:
    s, t = leaf(5, 3, seed=1), leaf(5, 4, seed=2)
    torch.testing.assert_close(cc_loss(s, t, gamma=0.4, order=14), naive.cc_rbf_exact(s, t, 0.4))
    t2 = leaf(5, 3, seed=3)
    assert_matches_reference(lambda s, t: cc_loss(s, t, variant="repdistiller"), naive.cc_repdistiller, [s, t2], [s])
    assert torch.autograd.gradcheck(lambda s: cc_loss(s, t), (s,))
    assert_teacher_detached(cc_loss, s, t)


@SETTINGS
@given(st.integers(2, 5), st.integers(2, 4), seeds, st.floats(0.1, 10.0))
def test_cc_invariant_to_scale_and_rotation(b: int, d: int, seed: int, scale: float) -> None:
    s, t = leaf(b, d, seed=seed), leaf(b, d, seed=seed + 1)
    base = cc_loss(s, t)
    torch.testing.assert_close(cc_loss(scale * s @ _rotation(d, seed), t), base)
    assert cc_loss(t, t.detach()).abs().item() < 1e-12


# ------------------------------------------------------------------------------------------------ RKD


@pytest.mark.parametrize("pairs", ["all", "distinct"])
@pytest.mark.parametrize(("wd", "wa"), [(25.0, 50.0), (1.0, 0.0), (0.0, 2.0)])
def test_rkd_matches_reference(pairs: str, wd: float, wa: float) -> None:
    s, t = leaf(4, 3, seed=1), leaf(4, 5, seed=2, scale=0.3)
    assert_matches_reference(
        lambda s, t: rkd_loss(s, t, distance_weight=wd, angle_weight=wa, pairs=pairs),  # type: ignore[arg-type]
        lambda s, t: naive.rkd(s, t, wd, wa, pairs),
        [s, t],
        [s],
    )


def test_rkd_gradcheck_and_coincident_points() -> None:
    s, t = leaf(3, 2, seed=1), leaf(3, 4, seed=2)
    assert torch.autograd.gradcheck(lambda s: rkd_loss(s, t), (s,))
    assert torch.autograd.gradcheck(lambda s: rkd_loss(s, t, pairs="distinct"), (s,))
    assert_teacher_detached(rkd_loss, s, t)
    # two identical samples: distance 0 and undefined angles must not give NaN
    dup = torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.0, 1.0]], dtype=F64, requires_grad=True)
    assert_finite_with_grad(rkd_loss(dup, t), dup)
    same = torch.zeros(3, 2, requires_grad=True)
    assert_finite_with_grad(rkd_loss(same, torch.zeros(3, 2)), same)


@SETTINGS
@given(st.integers(3, 6), st.integers(2, 4), seeds, st.floats(0.05, 20.0), st.floats(-5.0, 5.0))
def test_rkd_invariant_to_rotation_scale_translation(b: int, d: int, seed: int, scale: float, shift: float) -> None:
    s, t = leaf(b, d, seed=seed), leaf(b, d + 2, seed=seed + 1)
    for pairs in ("all", "distinct"):
        base = rkd_loss(s, t, pairs=pairs)  # type: ignore[arg-type]
        moved = scale * s @ _rotation(d, seed) + shift
        torch.testing.assert_close(rkd_loss(moved, t, pairs=pairs), base)  # type: ignore[arg-type]
        torch.testing.assert_close(rkd_loss(s, t * scale, pairs=pairs), base)  # type: ignore[arg-type]
    assert rkd_loss(t, t.detach()).abs().item() < 1e-10


# ------------------------------------------------------------------------------------------------ PKT


@pytest.mark.parametrize("include_self", [True, False])
def test_pkt_matches_reference(include_self: bool) -> None:
    s, t = leaf(5, 3, seed=1), leaf(5, 4, seed=2)
    assert_matches_reference(
        lambda s, t: pkt_loss(s, t, include_self=include_self, reduction="sum", eps=0.0),
        lambda s, t: naive.pkt(s, t, include_self),
        [s, t],
        [s],
    )


def test_pkt_default_matches_repdistiller_to_first_order_in_eps() -> None:
    s, t = leaf(6, 3, seed=1), leaf(6, 5, seed=2)
    torch.testing.assert_close(pkt_loss(s, t), naive.pkt_repdistiller(s, t), atol=1e-6, rtol=1e-5)


def test_pkt_equals_repdistiller_exactly_with_eps_zero() -> None:
    """eps = 0 on both sides: kdloss's PKT (include_self, "mean") is RepDistiller's PKT to rounding."""
    s, t = leaf(6, 3, seed=3), leaf(6, 5, seed=4)
    assert_matches_reference(
        lambda s, t: pkt_loss(s, t, eps=0.0), lambda s, t: naive.pkt_repdistiller(s, t, eps=0.0), [s, t], [s], 1e-13
    )


@pytest.mark.parametrize("seed", [0, 2, 3, 4])
def test_pkt_default_eps_differs_from_repdistiller_by_the_documented_first_order_term(seed: int) -> None:
    """With eps = 1e-7 on both sides the two differ by about eps * mean_ij(q_ij / p_ij - 1) (q the
    teacher's, p the student's conditionals; RepDistiller's eps inside the norms adds O(eps / |e|),
    negligible for embeddings of norm ~1e3): not bounded by eps, it grows with q / p, as documented."""
    g = torch.Generator().manual_seed(seed)
    s = (1e3 * torch.randn(4, 3, generator=g, dtype=F64)).requires_grad_(True)
    t = 1e3 * torch.randn(4, 3, generator=g, dtype=F64)

    def conditional(e: torch.Tensor) -> torch.Tensor:
        e = e / e.norm(dim=1, keepdim=True)
        k = (e @ e.T + 1.0) / 2.0
        return k / k.sum(dim=1, keepdim=True)

    q, p = conditional(t), conditional(s.detach())
    first_order = 1e-7 * (q / p - 1.0).mean()
    diff = pkt_loss(s, t) - naive.pkt_repdistiller(s, t)
    torch.testing.assert_close(diff, first_order, rtol=5e-3, atol=1e-9)  # atol: the O(eps / |e|) term
    if seed in (2, 3):  # more than eps: "matches to within eps" would be false here
        assert diff.abs() > 1e-7
    doc = pkt_loss.__doc__ or ""
    assert "to within ``eps``" not in doc
    assert "eps = 0" in doc


def test_pkt_reductions_gradcheck() -> None:
    s, t = leaf(4, 3, seed=1), leaf(4, 2, seed=2)
    none = pkt_loss(s, t, reduction="none")
    assert none.shape == (4,)
    torch.testing.assert_close(pkt_loss(s, t, reduction="sum"), none.sum())
    torch.testing.assert_close(pkt_loss(s, t, reduction="batchmean"), none.sum() / 4)
    torch.testing.assert_close(pkt_loss(s, t), none.sum() / 16)  # RepDistiller's mean over B x B
    assert torch.autograd.gradcheck(lambda s: pkt_loss(s, t, reduction="none"), (s,))
    assert_teacher_detached(pkt_loss, s, t)


@SETTINGS
@given(st.integers(3, 6), st.integers(2, 4), seeds)
def test_pkt_invariants(b: int, d: int, seed: int) -> None:
    s, t = leaf(b, d, seed=seed), leaf(b, d + 1, seed=seed + 1)
    base = pkt_loss(s, t, reduction="none")
    row_scale = torch.rand(b, 1, generator=torch.Generator().manual_seed(seed), dtype=F64) + 0.1
    torch.testing.assert_close(pkt_loss(row_scale * s @ _rotation(d, seed), t, reduction="none"), base)
    assert (base >= -1e-12).all()
    assert pkt_loss(t, t.detach()).abs().item() < 1e-12


def test_pkt_opposite_embeddings_are_finite() -> None:
    s = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    t = torch.tensor([[0.0, 1.0], [0.0, -1.0], [1.0, 0.0]])
    for include_self in (True, False):
        assert_finite_with_grad(pkt_loss(s, t, include_self=include_self), s)


# ------------------------------------------------------------------------------------------------ FSP


@pytest.mark.parametrize("variant", ["paper", "repdistiller"])
def test_fsp_matches_reference(variant: str) -> None:
    s = [leaf(2, 2, 4, 4, seed=1), leaf(2, 3, 4, 4, seed=2), leaf(2, 2, 4, 4, seed=3)]
    t = [leaf(2, 2, 4, 4, seed=4), leaf(2, 3, 4, 4, seed=5), leaf(2, 2, 4, 4, seed=6)]
    assert_matches_reference(
        lambda *x: fsp_loss(list(x[:3]), list(x[3:]), variant=variant),  # type: ignore[arg-type]
        lambda *x: naive.fsp(list(x[:3]), list(x[3:]), variant),
        [*s, *t],
        s,
    )


def test_fsp_pools_different_sizes_and_reductions() -> None:
    a, b = leaf(2, 2, 4, 4, seed=1), leaf(2, 3, 2, 2, seed=2)
    pooled = torch.nn.functional.adaptive_avg_pool2d(a, 2)
    torch.testing.assert_close(fsp_matrix(a, b), naive.fsp_matrix(pooled, b))
    s, t = [a, b], [leaf(2, 2, 8, 8, seed=3), leaf(2, 3, 4, 4, seed=4)]
    none = fsp_loss(s, t, reduction="none")
    assert none.shape == (2,)
    torch.testing.assert_close(fsp_loss(s, t, reduction="sum"), none.sum())
    torch.testing.assert_close(fsp_loss(s, t, reduction="batchmean"), none.mean())
    assert fsp_loss(t, [x.detach() for x in t]).abs().item() < 1e-12
    assert torch.autograd.gradcheck(lambda x: fsp_loss([x, b], t), (a,))


# ------------------------------------------------------------------------------------------------ NST


@pytest.mark.parametrize(("degree", "bias"), [(2, 0.0), (1, 0.5), (3, 1.0)])
def test_nst_matches_reference(degree: int, bias: float) -> None:
    s, t = leaf(2, 3, 2, 3, seed=1), leaf(2, 4, 2, 3, seed=2)
    assert_matches_reference(
        lambda s, t: nst_loss(s, t, degree=degree, bias=bias, reduction="mean"),
        lambda s, t: naive.nst(s, t, degree, bias),
        [s, t],
        [s],
    )


def test_per_sample_losses_of_an_empty_batch_are_zero() -> None:
    m = torch.zeros(0, 3, 2, 2, requires_grad=True)
    assert fsp_loss([m, m], [m, m]).item() == 0.0
    assert nst_loss(m, m).item() == 0.0
    assert nst_loss(m, m, reduction="none").shape == (0,)


def test_nst_pairs_reductions_gradcheck() -> None:
    s, t = leaf(2, 3, 2, 2, seed=1), leaf(2, 4, 4, 4, seed=2)
    pooled = torch.nn.functional.adaptive_avg_pool2d(t, 2)
    torch.testing.assert_close(nst_loss(s, t), naive.nst(s, pooled, 2, 0.0))
    torch.testing.assert_close(nst_loss([s, s], [t, t], reduction="none"), 2 * nst_loss(s, t, reduction="none"))
    torch.testing.assert_close(nst_loss(s, t, reduction="sum"), nst_loss(s, t, reduction="none").sum())
    assert torch.autograd.gradcheck(lambda s: nst_loss(s, t), (s,))
    assert_teacher_detached(nst_loss, s, t)


@SETTINGS
@given(st.integers(1, 3), st.integers(1, 4), seeds)
def test_nst_invariants(b: int, c: int, seed: int) -> None:
    s, t = leaf(b, c, 2, 2, seed=seed), leaf(b, c + 1, 2, 2, seed=seed + 1)
    base = nst_loss(s, t, reduction="none")
    assert (base >= -1e-12).all()  # an MMD with a positive-definite kernel
    perm = torch.randperm(c, generator=torch.Generator().manual_seed(seed))
    scale = torch.rand(1, c, 1, 1, generator=torch.Generator().manual_seed(seed), dtype=F64) + 0.1
    torch.testing.assert_close(nst_loss(s[:, perm] * scale, t, reduction="none"), base)
    assert nst_loss(t, t.detach()).abs().item() < 1e-12


# ------------------------------------------------------------------------------------------------ all


CASES: list[tuple[str, Callable[..., torch.Tensor], Callable[[torch.Tensor], object]]] = [
    ("sp", sp_loss, lambda x: x),
    ("cc", cc_loss, lambda x: x.flatten(1)),
    ("rkd", rkd_loss, lambda x: x.flatten(1)),
    ("pkt", pkt_loss, lambda x: x.flatten(1)),
    ("fsp", fsp_loss, lambda x: [x, x]),
    ("nst", nst_loss, lambda x: x),
]


@pytest.mark.parametrize(("name", "fn", "prep"), CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_and_extreme_inputs_are_finite(
    name: str, fn: Callable[..., torch.Tensor], prep: Callable[[torch.Tensor], object], dtype: torch.dtype
) -> None:
    g = torch.Generator().manual_seed(0)
    # float16 gradients of FSP's squared Gram differences overflow at 1e3 (~1e9 > 65504): AMP's job
    for scale in (1.0, 1e3 if dtype == torch.bfloat16 else 10.0):
        raw_s = (scale * torch.randn(4, 3, 2, 2, generator=g)).to(dtype).requires_grad_(True)
        raw_t = (scale * torch.randn(4, 3, 2, 2, generator=g)).to(dtype)
        loss = fn(prep(raw_s), prep(raw_t))
        assert loss.dtype == torch.float32, name
        assert_finite_with_grad(loss, raw_s)
    zeros = torch.zeros(4, 3, 2, 2, dtype=dtype, requires_grad=True)
    assert_finite_with_grad(fn(prep(zeros), prep(torch.zeros(4, 3, 2, 2, dtype=dtype))), zeros)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: sp_loss(torch.zeros(3, 2), torch.zeros(4, 2)), ShapeError, r"same batch size.*\(3, 2\) and \(4, 2\)"),
        (lambda: sp_loss(torch.zeros(1, 2), torch.zeros(1, 2)), ShapeError, r"needs B >= 2"),
        (lambda: sp_loss(torch.zeros(3), torch.zeros(3)), ShapeError, r"feature dimension"),
        (lambda: sp_loss([torch.zeros(3, 2)], []), ValueError, r"must pair up, got 1 and 0"),
        (lambda: sp_loss([], []), ValueError, r"at least one tensor"),
        (lambda: sp_loss(torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 2)), TypeError, "floating-point"),
        (lambda: cc_loss(torch.zeros(3, 2, 1), torch.zeros(3, 2)), ShapeError, r"\(B, D\) embeddings"),
        (lambda: cc_loss(torch.zeros(3, 2), torch.zeros(3, 2), gamma=0), ValueError, "gamma must be"),
        (lambda: cc_loss(torch.zeros(3, 2), torch.zeros(3, 2), order=-1), ValueError, "order must be >= 0, got -1"),
        (lambda: cc_loss(torch.zeros(3, 2), torch.zeros(3, 2), order=1.5), TypeError, "order must be an int"),
        (lambda: cc_loss(torch.zeros(3, 2), torch.zeros(3, 2), variant="x"), ValueError, "variant must be one of"),
        (
            lambda: cc_loss(torch.zeros(3, 2), torch.zeros(3, 4), variant="repdistiller"),
            ShapeError,
            r"equal shapes, got \(3, 2\) and \(3, 4\)",
        ),
        (lambda: rkd_loss(torch.zeros(3, 2), torch.zeros(3, 2), pairs="x"), ValueError, "pairs must be one of"),
        (lambda: rkd_loss(torch.zeros(3, 2), torch.zeros(3, 2), angle_weight=-1), ValueError, "angle_weight"),
        (lambda: rkd_loss(torch.zeros(2, 2), torch.zeros(2, 2), pairs="distinct"), ShapeError, "B >= 3"),
        (lambda: pkt_loss(torch.zeros(2, 2), torch.zeros(2, 2), include_self=False), ShapeError, "B >= 3"),
        (lambda: pkt_loss(torch.zeros(3, 2), torch.zeros(3, 2), reduction="x"), ValueError, "reduction"),
        (lambda: pkt_loss(torch.zeros(3, 2), torch.zeros(3, 2), eps=-1.0), ValueError, "eps must be"),
        (lambda: fsp_loss(torch.zeros(2, 2, 2, 2), torch.zeros(2, 2, 2, 2)), TypeError, "sequences of L >= 2"),
        (lambda: fsp_loss([torch.zeros(2, 2, 2, 2)], [torch.zeros(2, 2, 2, 2)]), ValueError, "at least 2 stages"),
        (
            lambda: fsp_loss([torch.zeros(2, 2, 2, 2)] * 2, [torch.zeros(2, 3, 2, 2)] * 2),
            ShapeError,
            r"student_features\[0\] and teacher_features\[0\] must have the same channel count.*got 2 and 3",
        ),
        (lambda: fsp_loss([torch.zeros(2, 2, 2)] * 2, [torch.zeros(2, 2, 2)] * 2), ShapeError, r"\(B, C, H, W\)"),
        (
            lambda: fsp_loss(*[[torch.zeros(2, 2, 2, 2), torch.zeros(3, 2, 2, 2)]] * 2),
            ShapeError,
            r"student_features\[0\] and student_features\[1\] must have the same batch size",
        ),
        (lambda: fsp_loss([torch.zeros(2, 2, 2, 2)] * 2, [torch.zeros(2, 2, 2, 2)] * 2, variant="v"), ValueError, "va"),
        (lambda: nst_loss(torch.zeros(2, 2, 2), torch.zeros(2, 2, 2)), ShapeError, r"\(B, C, H, W\)"),
        (lambda: nst_loss(torch.zeros(2, 2, 2, 2), torch.zeros(3, 2, 2, 2)), ShapeError, "same batch size"),
        (lambda: nst_loss(torch.zeros(2, 2, 2, 2), torch.zeros(2, 2, 2, 2), degree=0), ValueError, "degree must be"),
        (lambda: nst_loss(torch.zeros(2, 2, 2, 2), torch.zeros(2, 2, 2, 2), bias=-1.0), ValueError, "bias must be"),
    ],
)
def test_errors(call: Callable[[], object], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        call()


def test_modules_equal_functions_and_repr() -> None:
    s, t = leaf(4, 3), leaf(4, 5, seed=1)
    fs, ft = leaf(2, 3, 2, 2, seed=2), leaf(2, 3, 2, 2, seed=3)
    assert torch.equal(SPLoss()(s, t), sp_loss(s, t))
    assert torch.equal(CCLoss(gamma=0.5, order=3)(s, t), cc_loss(s, t, gamma=0.5, order=3))
    assert torch.equal(RKDLoss(pairs="distinct")(s, t), rkd_loss(s, t, pairs="distinct"))
    assert torch.equal(PKTLoss(reduction="sum")(s, t), pkt_loss(s, t, reduction="sum"))
    assert torch.equal(
        FSPLoss(variant="repdistiller")([fs, fs], [ft, ft]), fsp_loss([fs, fs], [ft, ft], variant="repdistiller")
    )
    assert torch.equal(NSTLoss(degree=1)(fs, ft), nst_loss(fs, ft, degree=1))
    assert repr(SPLoss()) == "SPLoss()"
    assert repr(CCLoss()) == "CCLoss(gamma=0.4, order=2, variant='paper')"
    assert repr(RKDLoss(distance_weight=1.0)) == "RKDLoss(distance_weight=1.0, angle_weight=50.0, pairs='all')"
    assert repr(PKTLoss(include_self=False)) == "PKTLoss(include_self=False, reduction='mean', eps=1e-07)"
    assert repr(FSPLoss(reduction="sum")) == "FSPLoss(variant='paper', reduction='sum')"
    assert repr(NSTLoss(bias=1.0)) == "NSTLoss(degree=2, bias=1.0, reduction='mean')"
    for m in (SPLoss(), CCLoss(), RKDLoss(), PKTLoss(), FSPLoss(), NSTLoss()):
        assert not list(m.parameters())
        assert not list(m.buffers())
    with pytest.raises(ValueError, match="variant"):
        CCLoss(variant="nope")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pairs"):
        RKDLoss(pairs="nope")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="degree"):
        NSTLoss(degree=0)
    with pytest.raises(ValueError, match="reduction"):
        FSPLoss(reduction="nope")  # type: ignore[arg-type]
