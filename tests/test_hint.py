"""Tests of hint_loss / HintLoss (FitNets) and cosine_hidden_loss / CosineHiddenLoss (the tutorial's hidden loss)."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

from kdloss import CosineHiddenLoss, HintLoss, ShapeError
from kdloss.functional import cosine_hidden_loss, hint_loss
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
from tests.naive import hint as naive
from tests.strategies import PROPERTY_SETTINGS, feature_pairs, reductions

F64 = Tol(1e-6, 1e-6)
SHAPES = [(4, 6), (3, 4, 5, 5)]
SHAPE_IDS = ["BD", "BCHW"]


def reduce_rows(rows: Tensor, reduction: str, elements_per_row: int = 1) -> Tensor:
    """The documented reductions of a per-sample loss whose value is a mean over `elements_per_row`."""
    if reduction == "none":
        return rows
    if reduction == "mean":
        return rows.mean() if rows.numel() else rows.sum()
    total = rows.sum() * elements_per_row
    return total if reduction == "sum" else total / max(rows.shape[0], 1)


def hint_reference(s: Tensor, t: Tensor, reduction: str) -> Tensor:
    """FitNets' squared error, written out: per-sample mean of (s - t)^2, then the reductions."""
    sq = (s - t).pow(2).flatten(1)
    return reduce_rows(sq.mean(1), reduction, sq.shape[1])


def cosine_reference(s: Tensor, t: Tensor, reduction: str) -> Tensor:
    """1 - <s, t> / (|s| |t|) per flattened sample; batchmean is the mean (one value per sample)."""
    s, t = s.flatten(1), t.flatten(1)
    rows = 1 - (s * t).sum(1) / (s.norm(dim=1) * t.norm(dim=1))
    return reduce_rows(rows, "mean" if reduction == "batchmean" else reduction)


FAMILY = [
    pytest.param(hint_loss, hint_reference, id="hint"),
    pytest.param(cosine_hidden_loss, cosine_reference, id="cosine"),
]


# --------------------------------------------------------------------------------------------
# The matrix: reduction x device x dtype
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("loss", "ref"), FAMILY)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_matrix(loss, ref, shape: tuple[int, ...], reduction: str, device: str, dtype_case: DtypeCase) -> None:  # type: ignore[no-untyped-def]
    s64, t64 = make_tensor(*shape, seed=1), make_tensor(*shape, seed=2)
    dt = dtype_case.dtype
    s, t = s64.to(device, dt), t64.to(device, dt)
    out = loss(s, t, reduction=reduction)
    assert out.device.type == device
    assert out.dtype == (torch.float64 if dt == torch.float64 else torch.float32)
    assert out.shape == ((shape[0],) if reduction == "none" else ())
    assert_close(out, ref(s.cpu().double(), t.cpu().double(), reduction), dtype_case.value)
    assert_close(out, ref(s64, t64, reduction), dtype_case.rounding)
    (g,) = grads(lambda a: loss(a, t, reduction=reduction), s)
    (g_ref,) = grads(lambda a: ref(a, t.cpu().double(), reduction), s.cpu().double())
    assert g.dtype == dt
    assert_close(g, g_ref, dtype_case.grad)


# --------------------------------------------------------------------------------------------
# Textbook references (float64, 1e-6, values and gradients)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_hint_equals_fitnets_mse(shape: tuple[int, ...]) -> None:
    s, t = make_tensor(*shape, seed=3, scale=2.0), make_tensor(*shape, seed=4)
    assert_close(hint_loss(s, t), naive.hint_mse(s, t), F64)
    assert_close(grads(hint_loss, s, t)[0], grads(naive.hint_mse, s, t)[0], F64)
    assert_close(hint_loss(s, t, reduction="sum"), F.mse_loss(s, t, reduction="sum"), F64)
    assert_close(hint_loss(s, t, reduction="none"), F.mse_loss(s, t, reduction="none").flatten(1).mean(1), F64)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_cosine_equals_tutorial_cosine_embedding_loss(shape: tuple[int, ...]) -> None:
    s, t = make_tensor(*shape, seed=5), make_tensor(*shape, seed=6)
    assert_close(cosine_hidden_loss(s, t), naive.cosine_hidden(s, t), F64)
    assert_close(grads(cosine_hidden_loss, s, t)[0], grads(naive.cosine_hidden, s, t)[0], F64)
    target = torch.ones(shape[0])
    summed = torch.nn.CosineEmbeddingLoss(reduction="sum")(s.flatten(1), t.flatten(1), target)
    assert_close(cosine_hidden_loss(s, t, reduction="sum"), summed, F64)


def test_teacher_gets_no_gradient() -> None:
    for loss in (hint_loss, cosine_hidden_loss):
        s = make_tensor(3, 8, seed=7, requires_grad=True)
        t = make_tensor(3, 8, seed=8, requires_grad=True)
        loss(s, t).backward()
        assert t.grad is None
        assert s.grad is not None
        assert s.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------


@PROPERTY_SETTINGS
@given(pair=feature_pairs())
def test_property_hint(pair: tuple[Tensor, Tensor]) -> None:
    s, t = pair
    out = {r: hint_loss(s, t, reduction=r) for r in REDUCTIONS}  # type: ignore[arg-type]
    b, d = s.shape[0], s[0].numel()
    assert (out["none"] >= 0).all()
    assert_close(out["batchmean"], out["sum"] / b, Tol(1e-12, 1e-10))
    assert_close(out["mean"], out["sum"] / (b * d), Tol(1e-12, 1e-10))
    assert_close(out["none"].mean(), out["mean"], Tol(1e-12, 1e-10))
    assert_close(hint_loss(t, s), out["mean"], Tol(0, 0))  # symmetric in value
    assert hint_loss(s, s.clone()) == 0


@PROPERTY_SETTINGS
@given(pair=feature_pairs(), scale_s=st.floats(1e-3, 1e3), scale_t=st.floats(1e-3, 1e3), reduction=reductions())
def test_property_cosine(pair: tuple[Tensor, Tensor], scale_s: float, scale_t: float, reduction: str) -> None:
    s, t = pair
    s = s + 0.01  # keep away from all-zero samples (see test_cosine_zero_vector)
    t = t + 0.01
    rows = cosine_hidden_loss(s, t, reduction="none")
    assert ((rows >= -1e-12) & (rows <= 2 + 1e-12)).all()
    floor = functools.partial(cosine_hidden_loss, eps=1e-12)  # the norm-floor form: the exact cosine here
    # invariant to positive rescaling of either side
    assert_close(
        floor(scale_s * s, scale_t * t, reduction=reduction), floor(s, t, reduction=reduction), Tol(1e-10, 1e-8)
    )  # type: ignore[arg-type]
    assert_close(floor(s, 3.0 * s, reduction="none"), torch.zeros_like(rows), Tol(1e-12, 0))
    assert_close(floor(s, -s, reduction="none"), torch.full_like(rows, 2.0), Tol(1e-12, 0))
    # torch's form (the default) adds 1e-12 to each squared norm: it is off the exact cosine by at most
    # about 1e-12 / |s|^2 + 1e-12 / |t|^2 per row, so its invariances hold to that size
    for a, b in ((s, t), (scale_s * s, scale_t * t), (s, 3.0 * s), (s, -s)):
        sq = torch.minimum(a.flatten(1).square().sum(1), b.flatten(1).square().sum(1))
        slack = float((4e-12 / sq).max()) + 1e-14
        assert_close(cosine_hidden_loss(a, b, reduction="none"), floor(a, b, reduction="none"), Tol(slack, 0))
    assert_close(cosine_hidden_loss(s, t, reduction="batchmean"), cosine_hidden_loss(s, t), Tol(0, 0))


# --------------------------------------------------------------------------------------------
# Edge cases
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", [hint_loss, cosine_hidden_loss], ids=["hint", "cosine"])
def test_empty_batch(loss, reduction: str) -> None:  # type: ignore[no-untyped-def]
    """An empty batch gives 0 (F.mse_loss gives NaN there) and an empty gradient."""
    s = torch.zeros(0, 4, 3, 3, requires_grad=True)
    out = loss(s, torch.zeros(0, 4, 3, 3), reduction=reduction)
    if reduction == "none":
        assert out.shape == (0,)
    else:
        assert out.shape == ()
        assert out.item() == 0.0
    out.sum().backward()
    assert s.grad is not None
    assert s.grad.shape == s.shape
    assert torch.isnan(F.mse_loss(torch.zeros(0, 4), torch.zeros(0, 4)))


def test_hint_large_half_precision_features_stay_finite() -> None:
    """fp16 features of size 1e4: the squared error (4e8) overflows fp16 (max 65504) when computed
    in the input dtype, as a naive mse_loss on fp16 does; hint_loss computes in float32."""
    s = torch.full((2, 8), 1.0e4, dtype=torch.float16)
    t = torch.full((2, 8), -1.0e4, dtype=torch.float16)
    assert torch.isinf(naive.hint_mse(s, t))
    out = hint_loss(s, t)
    assert torch.isfinite(out)
    assert out.item() == pytest.approx(4.0e8, rel=1e-3)
    g = grads(hint_loss, s, t)[0]
    assert torch.isfinite(g).all()
    assert g.dtype == torch.float16


@pytest.mark.parametrize("loss", [hint_loss, cosine_hidden_loss], ids=["hint", "cosine"])
def test_inside_autocast_region_computes_in_float32(loss, device: str) -> None:  # type: ignore[no-untyped-def]
    s, t = make_tensor(3, 4, 5, 5, seed=24, dtype=torch.bfloat16, device=device), make_tensor(3, 4, 5, 5, seed=25)
    t = t.to(device, torch.bfloat16)
    outside = loss(s, t)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        inside = loss(s, t)
    assert inside.dtype == torch.float32
    assert_close(inside, outside, Tol(1e-6, 1e-6))


def test_cosine_zero_vector() -> None:
    """An all-zero representation: loss 1 (cosine 0 by the eps floor), finite gradient of size ~1/eps."""
    s = torch.zeros(2, 3, dtype=torch.float64)
    t = make_tensor(2, 3, seed=9)
    rows = cosine_hidden_loss(s, t, reduction="none")
    assert_close(rows, torch.ones(2, dtype=torch.float64), Tol(0, 0))
    (g,) = grads(lambda a: cosine_hidden_loss(a, t, eps=1e-4), s)
    assert torch.isfinite(g).all()
    assert 1e2 < float(g.abs().max()) < 1e5
    assert torch.isfinite(cosine_hidden_loss(s, s)).all()


def test_cosine_default_is_torch_cosine_embedding_loss_at_zero_rows() -> None:
    """eps=None (the default) is torch.nn.CosineEmbeddingLoss (target +1) also where a row is all zero:
    same values, same gradients (size ~1e6 there, not ~1/eps = 1e8 as with the norm floor eps=1e-8)."""
    s = make_tensor(4, 5, seed=30)
    t = make_tensor(4, 5, seed=31)
    s[1] = 0.0  # a dead student row
    t[2] = 0.0  # a dead teacher row
    s[3], t[3] = 0.0, 0.0

    def torch_loss(a: Tensor, b: Tensor) -> Tensor:
        return torch.nn.CosineEmbeddingLoss(reduction="none")(a, b, torch.ones(a.shape[0], dtype=a.dtype))

    def formula(a: Tensor, b: Tensor) -> Tensor:  # written from the formula, float64
        return 1 - (a * b).sum(1) / torch.sqrt(((a * a).sum(1) + 1e-12) * ((b * b).sum(1) + 1e-12))

    ours = functools.partial(cosine_hidden_loss, reduction="none")
    for ref in (torch_loss, formula):
        assert_close(ours(s, t), ref(s, t), Tol(1e-12, 1e-12))
        assert_close(grads(ours, s, t)[0], grads(ref, s, t)[0], Tol(1e-9, 1e-6))
    g = grads(ours, s, t)[0]
    assert 1e5 < float(g[1].norm()) < 1e7  # torch's size, 1e6 / |t| per entry
    g_floor = grads(lambda a, b: cosine_hidden_loss(a, b, reduction="none", eps=1e-8), s, t)[0]
    assert float(g_floor[1].norm()) > 50 * float(g[1].norm())  # the norm floor's gradient is ~100x larger
    assert_close(CosineHiddenLoss()(s, t), torch_loss(s, t).mean(), Tol(1e-12, 1e-12))


def test_cosine_flattens_from_dim_1() -> None:
    s, t = make_tensor(2, 4, 3, 3, seed=10), make_tensor(2, 36, seed=11)
    assert_close(cosine_hidden_loss(s, t), cosine_hidden_loss(s.flatten(1), t), Tol(0, 0))


@pytest.mark.parametrize("loss", [hint_loss, cosine_hidden_loss], ids=["hint", "cosine"])
def test_non_contiguous_inputs(loss) -> None:  # type: ignore[no-untyped-def]
    base = make_tensor(2, 3, 5, 5, seed=12)
    cases = {
        "channels_last": (base.to(memory_format=torch.channels_last), make_tensor(2, 3, 5, 5, seed=13)),
        "transposed": (base.transpose(2, 3), make_tensor(2, 3, 5, 5, seed=14).transpose(1, 2).transpose(1, 2)),
        "sliced": (base[:, :, ::2, 1:4], make_tensor(2, 3, 6, 3, seed=15)[:, :, ::2]),
        "expanded": (base[:, :1].expand(2, 3, 5, 5), make_tensor(2, 3, 5, 5, seed=16)),
    }
    for name, (s, t) in cases.items():
        out = loss(s, t, reduction="none")
        assert_close(out, loss(s.contiguous(), t.contiguous(), reduction="none"), Tol(1e-12, 1e-12), msg=name)
        g = grads(loss, s, t)[0]
        gc = grads(loss, s.contiguous(), t.contiguous())[0]
        assert_close(g, gc, Tol(1e-12, 1e-12), msg=name)


# --------------------------------------------------------------------------------------------
# gradcheck, compile
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", [hint_loss, cosine_hidden_loss], ids=["hint", "cosine"])
def test_gradcheck_float64(loss, reduction: str) -> None:  # type: ignore[no-untyped-def]
    s = make_tensor(2, 3, 2, 2, seed=17, requires_grad=True)
    t = make_tensor(2, 3, 2, 2, seed=18)
    assert torch.autograd.gradcheck(lambda a: loss(a, t, reduction=reduction), (s,))


@pytest.mark.slow
def test_compile_fullgraph_matches_eager() -> None:
    """One compile for the family: hint (mean, none) and cosine in one graph; inductor, forward and
    backward, ``dynamic=True`` (a second batch size and eps use the same graph).

    Slow on a cold cache: the first inductor compile in a process sets up the C++ toolchain (~10 s).
    """

    def family(s: Tensor, t: Tensor, h: Tensor, eps: float) -> Tensor:
        return torch.cat(
            [
                hint_loss(s, t).reshape(1),
                hint_loss(s, t, reduction="none"),
                cosine_hidden_loss(s, h, reduction="sum", eps=eps).reshape(1),
                cosine_hidden_loss(s, h, reduction="none"),
            ]
        )

    calls = [
        (
            make_tensor(b, 3, 4, 4, seed=19 + b, dtype=torch.float32),
            make_tensor(b, 3, 4, 4, seed=20, dtype=torch.float32),
            make_tensor(b, 48, seed=21, dtype=torch.float32),
            eps,
        )
        for b, eps in ((2, 1e-8), (3, 1e-6))
    ]
    compiled = assert_compiled_matches_eager(family, calls, Tol(1e-5, 1e-5))
    with pytest.raises((ValueError, RuntimeError), match=r"with an adapter"):
        compiled(calls[0][0], calls[0][1][:, :2], calls[0][2], 1e-8)


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "fn", "kwargs"),
    [
        (HintLoss(), hint_loss, {}),
        (HintLoss(reduction="none"), hint_loss, {"reduction": "none"}),
        (HintLoss(reduction="batchmean"), hint_loss, {"reduction": "batchmean"}),
        (CosineHiddenLoss(), cosine_hidden_loss, {}),
        (CosineHiddenLoss(reduction="sum", eps=1e-6), cosine_hidden_loss, {"reduction": "sum", "eps": 1e-6}),
    ],
    ids=["hint", "hint-none", "hint-batchmean", "cosine", "cosine-sum-eps"],
)
def test_module_equals_function_and_round_trips(module, fn, kwargs: dict[str, object]) -> None:  # type: ignore[no-untyped-def]
    s, t = make_tensor(3, 2, 4, 4, seed=22), make_tensor(3, 2, 4, 4, seed=23)
    assert torch.equal(module(s, t), fn(s, t, **kwargs))
    assert torch.equal(grads(module, s, t)[0], grads(lambda a, b: fn(a, b, **kwargs), s, t)[0])
    assert list(module.parameters()) == []
    assert list(module.buffers()) == []
    assert module.state_dict() == {}
    assert_state_dict_roundtrip(module, type(module)())
    for how, clone in roundtrip_module(module):
        assert type(clone) is type(module), how
        assert repr(clone) == repr(module), how
        assert torch.equal(clone(s, t), module(s, t)), how


def test_module_repr() -> None:
    assert repr(HintLoss()) == "HintLoss(reduction='mean')"
    assert repr(HintLoss(reduction="sum")) == "HintLoss(reduction='sum')"
    assert repr(CosineHiddenLoss()) == "CosineHiddenLoss(reduction='mean', eps=None)"
    assert repr(CosineHiddenLoss(reduction="none", eps=1e-6)) == "CosineHiddenLoss(reduction='none', eps=1e-06)"


# --------------------------------------------------------------------------------------------
# Error paths
# --------------------------------------------------------------------------------------------

X = torch.zeros(2, 4, 3, 3)
META = torch.zeros(2, 4, 3, 3, device="meta")

ERRORS = [
    (
        "hint-channels",
        lambda: hint_loss(torch.zeros(2, 8, 3, 3), X),
        ShapeError,
        r"student_feature \(after its adapter\) and teacher_feature must have the same shape, "
        r"got \(2, 8, 3, 3\) and \(2, 4, 3, 3\); map the student's feature .* with an adapter, e.g. kdloss.adapter_for",
    ),
    (
        "hint-batch",
        lambda: hint_loss(torch.zeros(3, 4, 3, 3), X),
        ShapeError,
        r"got \(3, 4, 3, 3\) and \(2, 4, 3, 3\) \(batch size 3 vs 2\)",
    ),
    (
        "hint-spatial",
        lambda: hint_loss(torch.zeros(2, 4, 6, 6), X),
        ShapeError,
        r"must have the same shape, got \(2, 4, 6, 6\) and \(2, 4, 3, 3\)",
    ),
    (
        "hint-broadcastable",
        lambda: hint_loss(torch.zeros(2, 4, 3, 3), torch.zeros(1, 4, 3, 3)),
        ShapeError,
        r"\(batch size 2 vs 1\)",
    ),
    (
        "hint-1d",
        lambda: hint_loss(torch.zeros(4), torch.zeros(4)),
        ShapeError,
        r"student_feature must have a batch and at least one feature dimension, got shape \(4,\)",
    ),
    (
        "hint-1d-teacher",
        lambda: hint_loss(torch.zeros(2, 3), torch.zeros(6)),
        ShapeError,
        r"teacher_feature must have a batch and at least one feature dimension, got shape \(6,\)",
    ),
    (
        "hint-int",
        lambda: hint_loss(X.long(), X),
        TypeError,
        r"student_feature must be a floating-point tensor .*got dtype torch.int64",
    ),
    (
        "hint-int-teacher",
        lambda: hint_loss(X, X.to(torch.uint8)),
        TypeError,
        r"teacher_feature must be a floating-point tensor .*got dtype torch.uint8",
    ),
    ("hint-tensor", lambda: hint_loss(X, 1.0), TypeError, r"teacher_feature must be a torch.Tensor, got float"),
    (
        "hint-device",
        lambda: hint_loss(X, META),
        ValueError,
        r"student_feature and teacher_feature must be on the same device, got cpu and meta",
    ),
    (
        "hint-reduction",
        lambda: hint_loss(X, X, reduction="elementwise"),
        ValueError,
        r"reduction must be one of 'none', 'mean', 'batchmean', 'sum', got 'elementwise'",
    ),
    (
        "cos-size",
        lambda: cosine_hidden_loss(torch.zeros(2, 10), torch.zeros(2, 12)),
        ShapeError,
        r"student_hidden \(flattened\) and teacher_hidden \(flattened\) must have the same shape, "
        r"got \(2, 10\) and \(2, 12\) \(class count 10 vs 12\); "
        r"pool or project one side first, e.g. kdloss.PoolAdapter",
    ),
    (
        "cos-batch",
        lambda: cosine_hidden_loss(torch.zeros(2, 12), torch.zeros(3, 4)),
        ShapeError,
        r"got \(2, 12\) and \(3, 4\) \(batch size 2 vs 3\)",
    ),
    (
        "cos-1d",
        lambda: cosine_hidden_loss(torch.zeros(2, 3), torch.zeros(6)),
        ShapeError,
        r"teacher_hidden must have a batch and at least one feature dimension, got shape \(6,\)",
    ),
    (
        "cos-int",
        lambda: cosine_hidden_loss(torch.zeros(2, 3, dtype=torch.int32), torch.zeros(2, 3)),
        TypeError,
        r"student_hidden must be a floating-point tensor .*got dtype torch.int32",
    ),
    (
        "cos-device",
        lambda: cosine_hidden_loss(META, X),
        ValueError,
        r"student_hidden and teacher_hidden must be on the same device, got meta and cpu",
    ),
    (
        "cos-reduction",
        lambda: cosine_hidden_loss(X, X, reduction="avg"),
        ValueError,
        r"reduction must be one of .* got 'avg'",
    ),
    ("cos-eps", lambda: cosine_hidden_loss(X, X, eps=0.0), ValueError, r"eps must be a finite number > 0, got 0.0"),
    ("HintLoss-reduction", lambda: HintLoss(reduction="max"), ValueError, r"reduction must be one of .* got 'max'"),
    ("HintLoss-call", lambda: HintLoss()(torch.zeros(2, 8, 3, 3), X), ShapeError, r"with an adapter"),
    (
        "Cosine-reduction",
        lambda: CosineHiddenLoss(reduction="max"),
        ValueError,
        r"reduction must be one of .* got 'max'",
    ),
    ("Cosine-eps", lambda: CosineHiddenLoss(eps=-1e-8), ValueError, r"eps must be a finite number > 0, got -1e-08"),
    (
        "Cosine-call",
        lambda: CosineHiddenLoss()(torch.zeros(2, 10), torch.zeros(2, 12)),
        ShapeError,
        r"kdloss.PoolAdapter",
    ),
]


@pytest.mark.parametrize(("call", "error", "match"), [c[1:] for c in ERRORS], ids=[c[0] for c in ERRORS])
def test_errors(call, error: type[Exception], match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_hint_loss_calls_the_mse_kernel_without_the_python_wrapper(
    monkeypatch: pytest.MonkeyPatch, reduction: str
) -> None:
    """The shapes are validated once by hint_loss; F.mse_loss's own Python checks (as long as the kernel on
    small features) are not paid a second time. The value is still F.mse_loss's."""
    import kdloss.functional.hint as hint_module

    s, t = torch.randn(3, 4, 2, 2, dtype=torch.float64), torch.randn(3, 4, 2, 2, dtype=torch.float64)
    want = {
        "mean": F.mse_loss(s, t),
        "sum": F.mse_loss(s, t, reduction="sum"),
        "batchmean": F.mse_loss(s, t, reduction="sum") / 3,
        "none": F.mse_loss(s, t, reduction="none").flatten(1).mean(1),
    }[reduction]

    def refuse(*args: object, **kwargs: object) -> Tensor:
        raise AssertionError("F.mse_loss called")

    monkeypatch.setattr(hint_module.F, "mse_loss", refuse)
    torch.testing.assert_close(hint_loss(s, t, reduction=reduction), want, rtol=1e-12, atol=1e-12)  # type: ignore[arg-type]
