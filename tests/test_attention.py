"""Tests of attention_map / attention_loss / AttentionLoss (Zagoruyko & Komodakis attention transfer)."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

from kdloss import AttentionLoss, ShapeError
from kdloss.functional import attention_loss, attention_map
from tests.helpers import (
    REDUCTIONS,
    DtypeCase,
    Tol,
    assert_close,
    assert_compiled_matches_eager,
    assert_state_dict_roundtrip,
    grads,
    make_tensor,
    roundtrip_module,
)
from tests.naive import attention as naive
from tests.strategies import PROPERTY_SETTINGS, feature_pairs, reductions

F64 = Tol(1e-6, 1e-6)


def at_reference(students: list[Tensor], teachers: list[Tensor], beta: float, reduction: str) -> Tensor:
    """Per-sample textbook AT (same spatial sizes), summed over pairs, then the documented reductions."""
    rows = sum((naive.at_map(s) - naive.at_map(t)).pow(2).mean(1) for s, t in zip(students, teachers))
    rows = beta * rows  # type: ignore[assignment]
    assert isinstance(rows, Tensor)
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.mean() if rows.numel() else rows.sum()


def pairs(dtype: torch.dtype = torch.float64, device: str = "cpu") -> tuple[list[Tensor], list[Tensor]]:
    """Two pairs with different channel counts (student 3/5, teacher 8/6), like real student/teacher."""
    students = [make_tensor(3, 3, 4, 4, seed=1).relu(), make_tensor(3, 5, 2, 3, seed=2)]
    teachers = [make_tensor(3, 8, 4, 4, seed=3, scale=2.0).relu(), make_tensor(3, 6, 2, 3, seed=4)]
    return [s.to(device, dtype) for s in students], [t.to(device, dtype) for t in teachers]


# --------------------------------------------------------------------------------------------
# The matrix: reduction x device x dtype
# --------------------------------------------------------------------------------------------


def test_matrix(reduction: str, device: str, dtype_case: DtypeCase) -> None:
    s64, t64 = pairs()
    s, t = pairs(dtype_case.dtype, device)
    out = attention_loss(s, t, beta=10.0, reduction=reduction)  # type: ignore[arg-type]
    assert out.device.type == device
    assert out.dtype == (torch.float64 if dtype_case.dtype == torch.float64 else torch.float32)
    assert out.shape == ((3,) if reduction == "none" else ())
    same = [x.cpu().double() for x in s], [x.cpu().double() for x in t]
    assert_close(out, at_reference(*same, beta=10.0, reduction=reduction), dtype_case.value)
    assert_close(out, at_reference(s64, t64, beta=10.0, reduction=reduction), dtype_case.rounding)
    g = grads(lambda a, b: attention_loss([a, b], t, beta=10.0, reduction=reduction), *s)  # type: ignore[arg-type]
    g_ref = grads(lambda a, b: at_reference([a, b], same[1], 10.0, reduction), *same[0])
    for got, want in zip(g, g_ref):
        assert got.dtype == dtype_case.dtype
        assert_close(got, want, dtype_case.grad)


# --------------------------------------------------------------------------------------------
# Textbook references (float64, 1e-6, values and gradients)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 3, 4, 4), (3, 1, 5, 2)])
def test_attention_map_equals_paper(shape: tuple[int, ...]) -> None:
    x = make_tensor(*shape, seed=5)
    a = attention_map(x)
    assert a.shape == (shape[0], shape[2] * shape[3])
    assert_close(a, naive.at_map(x), F64)
    assert_close(a.norm(dim=1), torch.ones(shape[0], dtype=torch.float64), Tol(1e-12, 0))
    assert_close(grads(attention_map, x)[0], grads(naive.at_map, x)[0], F64)
    # the paper sums |f|^p over channels: the mean differs by 1/C, which normalising removes
    summed = F.normalize(x.abs().pow(3).sum(1).flatten(1))
    assert_close(attention_map(x, p=3.0), summed, F64)


@pytest.mark.parametrize("beta", [1.0, 1000.0])
def test_attention_loss_equals_paper(beta: float) -> None:
    s, t = pairs()
    assert_close(attention_loss(s, t, beta=beta), naive.at_loss(s, t, beta=beta), F64)
    g = grads(lambda a, b: attention_loss([a, b], t, beta=beta), *s)
    g_ref = grads(lambda a, b: naive.at_loss([a, b], t, beta=beta), *s)
    for got, want in zip(g, g_ref):
        assert_close(got, want, F64)


def test_different_spatial_sizes_pool_maps_option() -> None:
    """pool="maps": a 4x larger teacher map (8x8 vs 4x4) has its channel energy average-pooled 2x2."""
    s = make_tensor(2, 3, 4, 4, seed=6)
    t = make_tensor(2, 7, 8, 8, seed=7)
    at = functools.partial(attention_loss, pool="maps")
    assert_close(at(s, t), naive.at_loss_pooled(s, t), F64)
    assert_close(grads(at, s, t)[0], grads(naive.at_loss_pooled, s, t)[0], F64)
    # and the other way round: a larger student map is pooled to the teacher's size
    assert_close(at(t, s), naive.at_loss_pooled(t, s), F64)
    assert_close(grads(at, t, s)[0], grads(naive.at_loss_pooled, t, s)[0], F64)
    # sizes that do not divide (5x7 vs 3x2) still pair up, and which side is larger does not matter
    a, b = make_tensor(2, 3, 5, 7, seed=8), make_tensor(2, 4, 3, 2, seed=9)
    assert_close(at(a, b), at(b, a), Tol(1e-12, 1e-12))
    assert_close(at(a, b), naive.at_loss_pool_maps(a, b), F64)
    assert_close(grads(at, a, b)[0], grads(naive.at_loss_pool_maps, a, b)[0], F64)


# (student shape, teacher shape): square pairs as in RepDistiller / mdistiller, then non-square ones
SQUARE_PAIRS = [((2, 3, 8, 8), (2, 5, 4, 4)), ((2, 3, 4, 4), (2, 5, 8, 8)), ((3, 2, 6, 6), (3, 4, 4, 4))]
NON_SQUARE_PAIRS = [
    ((2, 3, 6, 10), (2, 5, 3, 5)),  # the student larger in both dimensions
    ((2, 3, 8, 4), (2, 5, 4, 8)),  # each larger in one dimension: both are pooled, to 4x4
    ((2, 3, 5, 7), (2, 4, 3, 2)),  # sizes that do not divide
    ((2, 3, 4, 6), (2, 4, 4, 3)),  # equal heights
]


@pytest.mark.parametrize(("s_shape", "t_shape"), SQUARE_PAIRS)
def test_default_pools_features_as_repdistiller(s_shape: tuple[int, ...], t_shape: tuple[int, ...]) -> None:
    """The default (pool="features") is RepDistiller's / mdistiller's at_loss: the larger *feature map*
    is adaptive-average-pooled to the smaller one's size before squaring (float64, values and gradients)."""
    s, t = make_tensor(*s_shape, seed=31), make_tensor(*t_shape, seed=32, scale=2.0)
    assert_close(attention_loss(s, t), naive.at_loss_repdistiller(s, t), F64)
    assert_close(grads(attention_loss, s, t)[0], grads(naive.at_loss_repdistiller, s, t)[0], F64)
    beta = functools.partial(attention_loss, beta=1000.0, reduction="sum")
    ref = functools.partial(naive.at_loss_repdistiller, beta=1000.0 * s_shape[0])  # sum = B x mean
    assert_close(beta(s, t), ref(s, t), F64)
    assert_close(grads(beta, s, t)[0], grads(ref, s, t)[0], F64)
    # the map-pooling option gives other values here (pooling after squaring keeps more energy)
    assert (attention_loss(s, t) - attention_loss(s, t, pool="maps")).abs() > 1e-3 * attention_loss(s, t)


@pytest.mark.parametrize(("s_shape", "t_shape"), NON_SQUARE_PAIRS)
def test_default_pools_features_non_square(s_shape: tuple[int, ...], t_shape: tuple[int, ...]) -> None:
    """Non-square maps: both feature maps are pooled to (min H, min W), then compared."""
    s, t = make_tensor(*s_shape, seed=33), make_tensor(*t_shape, seed=34)
    assert_close(attention_loss(s, t), naive.at_loss_pool_features(s, t), F64)
    assert_close(grads(attention_loss, s, t)[0], grads(naive.at_loss_pool_features, s, t)[0], F64)
    assert_close(attention_loss(t, s), naive.at_loss_pool_features(t, s), F64)
    assert_close(grads(attention_loss, t, s)[0], grads(naive.at_loss_pool_features, t, s)[0], F64)
    maps = functools.partial(attention_loss, pool="maps")
    assert_close(maps(s, t), naive.at_loss_pool_maps(s, t), F64)
    assert_close(grads(maps, s, t)[0], grads(naive.at_loss_pool_maps, s, t)[0], F64)


def test_pool_options_agree_on_equal_sizes_and_module_passes_pool() -> None:
    s, t = pairs()
    assert torch.equal(attention_loss(s, t, pool="features"), attention_loss(s, t, pool="maps"))
    a, b = make_tensor(2, 3, 8, 8, seed=35), make_tensor(2, 5, 4, 4, seed=36)
    assert torch.equal(AttentionLoss(pool="maps")(a, b), attention_loss(a, b, pool="maps"))
    assert torch.equal(AttentionLoss()(a, b), attention_loss(a, b, pool="features"))
    with pytest.raises(ValueError, match=r"pool must be one of 'features', 'maps', got 'energy'"):
        attention_loss(a, b, pool="energy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"pool must be one of 'features', 'maps', got 'energy'"):
        AttentionLoss(pool="energy")  # type: ignore[arg-type]


def test_single_tensor_equals_one_pair_list() -> None:
    s, t = pairs()
    assert torch.equal(attention_loss(s[0], t[0]), attention_loss([s[0]], [t[0]]))
    assert torch.equal(attention_loss(tuple(s), tuple(t)), attention_loss(s, t))


def test_teacher_gets_no_gradient() -> None:
    s = make_tensor(2, 3, 4, 4, seed=10, requires_grad=True)
    t = make_tensor(2, 5, 4, 4, seed=11, requires_grad=True)
    attention_loss(s, t).backward()
    assert t.grad is None
    assert s.grad is not None
    assert s.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------


@PROPERTY_SETTINGS
@given(
    pair=feature_pairs(same_channels=False),
    beta=st.floats(0.0, 1000.0),
    scale_s=st.floats(1e-2, 1e2),
    scale_t=st.floats(1e-2, 1e2),
    reduction=reductions(),
)
def test_property_attention(
    pair: tuple[Tensor, Tensor], beta: float, scale_s: float, scale_t: float, reduction: str
) -> None:
    s, t = pair
    out = {r: attention_loss(s, t, beta=beta, reduction=r) for r in REDUCTIONS}  # type: ignore[arg-type]
    hw = s.shape[-1] * s.shape[-2]
    assert ((out["none"] >= 0) & (out["none"] <= 4 * beta / hw + 1e-9)).all()
    assert_close(out["sum"], out["none"].sum(), Tol(1e-12, 1e-10))
    assert_close(out["mean"], out["none"].mean(), Tol(1e-12, 1e-10))
    assert_close(out["batchmean"], out["mean"], Tol(0, 0))
    # linear in beta, zero for identical maps, invariant to a positive rescaling of either feature
    assert_close(attention_loss(s, t, beta=1.0) * beta, out["mean"], Tol(1e-12, 1e-10))
    assert_close(
        attention_loss(s, s.clone(), beta=beta, reduction="none"), torch.zeros_like(out["none"]), Tol(1e-12, 0)
    )
    kw = dict(beta=beta, reduction=reduction)
    assert_close(attention_loss(scale_s * s, scale_t * t, **kw), out[reduction], Tol(1e-10, 1e-8))  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Edge cases
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [((4, 4), (4, 4)), ((4, 4), (2, 2))], ids=["same", "pooled"])
def test_empty_batch(reduction: str, sizes: tuple[tuple[int, int], tuple[int, int]]) -> None:
    s = torch.zeros(0, 3, *sizes[0], requires_grad=True)
    out = attention_loss(s, torch.zeros(0, 5, *sizes[1]), reduction=reduction)  # type: ignore[arg-type]
    if reduction == "none":
        assert out.shape == (0,)
    else:
        assert out.shape == ()
        assert out.item() == 0.0
    out.sum().backward()
    assert s.grad is not None
    assert s.grad.shape == s.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_extreme_and_zero_features_stay_finite(dtype: torch.dtype) -> None:
    """Activations of 1e3 (|f|^2 = 1e6 overflows fp16) and all-zero maps (dead ReLU): finite, no NaN."""
    s = torch.full((2, 3, 4, 4), 1.0e3, dtype=dtype)
    s[:, :, 0, 0] = -2.0e3
    t = torch.zeros(2, 4, 4, 4, dtype=dtype)
    t[0, :, 1, 1] = 1.0e3
    out = attention_loss(s, t)
    assert torch.isfinite(out)
    ref = at_reference([s.double()], [t.double()], 1.0, "mean")
    assert_close(out, ref, Tol(1e-5, 1e-5))
    for a, b in ((s, t), (t, s), (torch.zeros_like(s), t)):
        g = grads(attention_loss, a, b)[0]
        assert torch.isfinite(g).all()
    assert torch.isfinite(attention_map(torch.zeros(2, 3, 4, 4, dtype=dtype))).all()


def test_inside_autocast_region_computes_in_float32(device: str) -> None:
    s, t = pairs(torch.bfloat16, device)
    outside = attention_loss(s, t, beta=1000.0)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        inside = attention_loss(s, t, beta=1000.0)
    assert inside.dtype == torch.float32
    assert_close(inside, outside, Tol(1e-6, 1e-6))


def test_non_contiguous_inputs() -> None:
    base = make_tensor(2, 3, 4, 4, seed=12)
    t = make_tensor(2, 6, 4, 4, seed=13)
    cases = {
        "channels_last": (base.to(memory_format=torch.channels_last), t.to(memory_format=torch.channels_last)),
        "transposed": (base.transpose(2, 3), t),
        "sliced": (make_tensor(2, 6, 8, 4, seed=14)[:, ::2, ::2], t[:, 1:]),
    }
    for name, (a, b) in cases.items():
        assert_close(attention_loss(a, b), attention_loss(a.contiguous(), b.contiguous()), Tol(1e-12, 1e-12), msg=name)
        got = grads(attention_loss, a, b)[0]
        assert_close(got, grads(attention_loss, a.contiguous(), b.contiguous())[0], Tol(1e-12, 1e-12), msg=name)


# --------------------------------------------------------------------------------------------
# gradcheck, compile
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [((3, 3), (3, 3)), ((2, 2), (4, 4))], ids=["same", "pooled"])
def test_gradcheck_float64(sizes: tuple[tuple[int, int], tuple[int, int]]) -> None:
    s = make_tensor(2, 2, *sizes[0], seed=15, requires_grad=True)
    t = make_tensor(2, 3, *sizes[1], seed=16)
    assert torch.autograd.gradcheck(lambda a: attention_loss(a, t, beta=3.0, reduction="none"), (s,))
    x = make_tensor(2, 2, 2, 3, seed=17, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: attention_map(a, p=3.0), (x,))


@pytest.mark.slow
@pytest.mark.parametrize("pool", ["features", "maps"])
def test_compile_fullgraph_matches_eager(pool: str) -> None:
    """One compile per pooling option: two pairs, one with pooling; inductor, forward and backward,
    ``dynamic=True`` (a second batch size and beta use the same graph).

    Slow on a cold cache: the first inductor compile in a process sets up the C++ toolchain (~10 s).
    """

    def family(s1: Tensor, s2: Tensor, t1: Tensor, t2: Tensor, beta: float) -> Tensor:
        return attention_loss([s1, s2], [t1, t2], beta=beta, reduction="none", pool=pool)  # type: ignore[arg-type]

    calls = [
        (
            make_tensor(b, 3, 4, 4, seed=18 + b, dtype=torch.float32),
            make_tensor(b, 4, 2, 2, seed=19, dtype=torch.float32),
            make_tensor(b, 5, 8, 8, seed=20, dtype=torch.float32),
            make_tensor(b, 6, 2, 2, seed=21, dtype=torch.float32),
            beta,
        )
        for b, beta in ((2, 1000.0), (3, 2.5))
    ]
    compiled = assert_compiled_matches_eager(family, calls, Tol(1e-5, 1e-5))
    s1, s2, t1, t2, _ = calls[0]
    with pytest.raises((ValueError, RuntimeError), match=r"must have the same batch size"):
        compiled(s1, s2, t1[:1], t2, 1.0)


# --------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs", [{}, {"beta": 1000.0}, {"p": 4.0, "reduction": "sum"}, {"reduction": "none", "beta": 0.5}], ids=str
)
def test_module_equals_function_and_round_trips(kwargs: dict[str, object]) -> None:
    s, t = pairs()
    module = AttentionLoss(**kwargs)  # type: ignore[arg-type]
    assert torch.equal(module(s, t), attention_loss(s, t, **kwargs))  # type: ignore[arg-type]
    assert torch.equal(module(s[0], t[0]), attention_loss(s[0], t[0], **kwargs))  # type: ignore[arg-type]
    got = grads(lambda a: module(a, t[0]), s[0])[0]
    assert torch.equal(got, grads(lambda a: attention_loss(a, t[0], **kwargs), s[0])[0])  # type: ignore[arg-type]
    assert list(module.parameters()) == []
    assert list(module.buffers()) == []
    assert module.state_dict() == {}
    assert_state_dict_roundtrip(module, AttentionLoss())
    for how, clone in roundtrip_module(module):
        assert type(clone) is AttentionLoss, how
        assert repr(clone) == repr(module), how
        assert torch.equal(clone(s, t), module(s, t)), how


def test_module_repr() -> None:
    assert repr(AttentionLoss()) == "AttentionLoss(p=2.0, beta=1.0, reduction='mean', pool='features')"
    assert (
        repr(AttentionLoss(p=1, beta=1000, reduction="sum", pool="maps"))
        == "AttentionLoss(p=1.0, beta=1000.0, reduction='sum', pool='maps')"
    )


# --------------------------------------------------------------------------------------------
# Error paths
# --------------------------------------------------------------------------------------------

X = torch.zeros(2, 3, 4, 4)
META = torch.zeros(2, 3, 4, 4, device="meta")

ERRORS = [
    (
        "count",
        lambda: attention_loss([X, X], [X]),
        ValueError,
        r"student_features and teacher_features must pair up, got 2 and 1 maps",
    ),
    (
        "empty",
        lambda: attention_loss([], []),
        ValueError,
        r"student_features must hold at least one feature map, got an empty sequence",
    ),
    (
        "3d",
        lambda: attention_loss(torch.zeros(2, 3, 4), X),
        ShapeError,
        r"student_features\[0\] must be a \(B, C, H, W\) feature map, got shape \(2, 3, 4\)",
    ),
    (
        "3d-teacher-2nd",
        lambda: attention_loss([X, X], [X, torch.zeros(2, 16)]),
        ShapeError,
        r"teacher_features\[1\] must be a \(B, C, H, W\) feature map, got shape \(2, 16\)",
    ),
    (
        "batch",
        lambda: attention_loss(X, torch.zeros(3, 3, 4, 4)),
        ShapeError,
        r"student_features\[0\] and teacher_features\[0\] must have the same batch size \(first dimension\), "
        r"got shapes \(2, 3, 4, 4\) and \(3, 3, 4, 4\)",
    ),
    (
        "int",
        lambda: attention_loss(X.long(), X),
        TypeError,
        r"student_features\[0\] must be a floating-point tensor .*got dtype torch.int64",
    ),
    (
        "not-tensor",
        lambda: attention_loss([X, None], [X, X]),
        TypeError,
        r"student_features\[1\] must be a torch.Tensor, got NoneType",
    ),
    (
        "device",
        lambda: attention_loss(X, META),
        ValueError,
        r"student_features\[0\] and teacher_features\[0\] must be on the same device, got cpu and meta",
    ),
    ("p=0", lambda: attention_loss(X, X, p=0.0), ValueError, r"p must be a finite number > 0, got 0.0"),
    ("beta<0", lambda: attention_loss(X, X, beta=-1.0), ValueError, r"beta must be a finite number >= 0, got -1.0"),
    ("beta=nan", lambda: attention_loss(X, X, beta=float("nan")), ValueError, r"beta must be a finite .* got nan"),
    ("beta=inf", lambda: attention_loss(X, X, beta=float("inf")), ValueError, r"beta must be a finite .* got inf"),
    ("beta=str", lambda: attention_loss(X, X, beta="1"), TypeError, r"beta must be a number >= 0, got str '1'"),
    ("reduction", lambda: attention_loss(X, X, reduction="avg"), ValueError, r"reduction must be one of .* got 'avg'"),
    (
        "map-3d",
        lambda: attention_map(torch.zeros(3, 4, 4)),
        ShapeError,
        r"feature must be a \(B, C, H, W\) feature map, got shape \(3, 4, 4\)",
    ),
    (
        "map-int",
        lambda: attention_map(X.int()),
        TypeError,
        r"feature must be a floating-point tensor .*got dtype torch.int32",
    ),
    ("map-p", lambda: attention_map(X, p=-2.0), ValueError, r"p must be a finite number > 0, got -2.0"),
    ("map-eps", lambda: attention_map(X, eps=0.0), ValueError, r"eps must be a finite number > 0, got 0.0"),
    ("module-p", lambda: AttentionLoss(p=0), ValueError, r"p must be a finite number > 0, got 0"),
    ("module-beta", lambda: AttentionLoss(beta=-0.5), ValueError, r"beta must be a finite number >= 0, got -0.5"),
    ("module-beta-bool", lambda: AttentionLoss(beta=True), TypeError, r"beta must be a number >= 0, got bool True"),
    (
        "module-reduction",
        lambda: AttentionLoss(reduction="mean_"),
        ValueError,
        r"reduction must be one of .* got 'mean_'",
    ),
    ("module-call", lambda: AttentionLoss()([X], [X, X]), ValueError, r"must pair up, got 1 and 2 maps"),
]


@pytest.mark.parametrize(("call", "error", "match"), [c[1:] for c in ERRORS], ids=[c[0] for c in ERRORS])
def test_errors(call, error: type[Exception], match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("p", [0.5, 1.0, 2.0])
def test_attention_gradient_finite_at_exact_zeros(p: float) -> None:
    """p < 1: d|f|^p/df is infinite at f = 0, so ReLU features (exact zeros) gave NaN gradients."""
    gen = torch.Generator().manual_seed(0)
    s = torch.relu(torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64)).requires_grad_()
    t = torch.randn(2, 5, 4, 4, generator=gen, dtype=torch.float64)
    attention_loss(s, t, p=p).backward()
    assert s.grad is not None
    assert torch.isfinite(s.grad).all()
    # the value is unchanged: |f|^p summed by hand
    q = s.detach().abs().pow(p).mean(dim=1).flatten(1)
    torch.testing.assert_close(attention_map(s.detach(), p=p), q / q.norm(dim=1, keepdim=True))
