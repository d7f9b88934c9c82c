"""Tests of soft_kl / KDLoss: the STYLE.md #11-#13 matrix, properties, and the known ways KD code breaks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import Tensor

from kdloss import KDLoss, ShapeError
from kdloss.functional import log_probs, soft_kl
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
from tests.naive import kl as naive
from tests.strategies import (
    PROPERTY_SETTINGS,
    LogitPair,
    betas,
    directions,
    logit_pairs,
    logit_shapes,
    row_masks,
    temperatures,
)

DIRECTIONS = ("forward", "reverse", "jsd")
F64 = Tol(1e-6, 1e-6)  # the bar: values and gradients match the textbook form to 1e-6 in float64
INF = float("-inf")


def reference(
    s: Tensor,
    t: Tensor,
    *,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    direction: str = "forward",
    beta: float = 0.5,
    mask: Tensor | None = None,
) -> Tensor:
    """soft_kl's documented contract written with the textbook per-row form (tests/naive.kl_rows)."""
    rows = naive.kl_rows(s, t, temperature, direction, beta)
    if mask is not None:
        rows = torch.where(mask, rows, 0.0)
    n = int(mask.sum()) if mask is not None else rows.numel()
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    if reduction == "batchmean":
        return rows.sum() / max(n, 1)
    return rows.sum() / max(n * s.shape[-1], 1)


def logits_pair(
    *shape: int, scale: float = 2.0, seed: int = 0, dtype: torch.dtype = torch.float64
) -> tuple[Tensor, Tensor]:
    return make_tensor(*shape, seed=seed, scale=scale, dtype=dtype), make_tensor(
        *shape, seed=seed + 1000, scale=scale, dtype=dtype
    )


def seq_mask() -> Tensor:
    return torch.tensor([[True, True, False, True], [False, True, True, False], [True, False, True, True]])


# --------------------------------------------------------------------------------------------
# The matrix: reduction x device x dtype, values and gradients, 2-D and masked 3-D logits
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("shape", [(5, 7), (3, 4, 7)], ids=["BC", "BLC"])
def test_matrix(reduction: str, device: str, dtype_case: DtypeCase, direction: str, shape: tuple[int, ...]) -> None:
    s64, t64 = logits_pair(*shape, seed=11)
    mask = seq_mask() if len(shape) == 3 else None
    kwargs = dict(
        temperature=2.0, reduction=reduction, direction=direction, jsd_weight=0.3 if direction == "jsd" else None
    )
    dt = dtype_case.dtype
    s, t = s64.to(device, dt), t64.to(device, dt)
    m = mask.to(device) if mask is not None else None

    out = soft_kl(s, t, mask=m, **kwargs)  # type: ignore[arg-type]
    assert out.device.type == device
    assert out.dtype == (torch.float64 if dt == torch.float64 else torch.float32)
    assert out.shape == (shape[:-1] if reduction == "none" else ())

    ref_kwargs = dict(temperature=2.0, reduction=reduction, direction=direction, beta=0.3, mask=mask)
    # Same (rounded) input values: float32 compute must be float32-tight, whatever the input dtype.
    assert_close(out, reference(s.cpu().double(), t.cpu().double(), **ref_kwargs), dtype_case.value)  # type: ignore[arg-type]
    # Unrounded values: what rounding the inputs to `dt` costs.
    assert_close(out, reference(s64, t64, **ref_kwargs), dtype_case.rounding)  # type: ignore[arg-type]

    (g,) = grads(lambda a: soft_kl(a, t, mask=m, **kwargs), s)  # type: ignore[arg-type]
    (g_ref,) = grads(lambda a: reference(a, t.cpu().double(), **ref_kwargs), s.cpu().double())  # type: ignore[arg-type]
    assert g.dtype == dt
    assert_close(g, g_ref, dtype_case.grad)


# --------------------------------------------------------------------------------------------
# Textbook references, float64, values and gradients to 1e-6
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0, 20.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_pytorch_tutorial_form_equals_batchmean(temperature: float, seed: int) -> None:
    """The tutorial's sum(p * (log p - log q)) / B * T^2 is soft_kl(reduction="batchmean")."""
    s, t = logits_pair(6, 10, seed=seed, scale=3.0)
    ours = soft_kl(s, t, temperature=temperature, reduction="batchmean")
    tutorial = naive.kd_tutorial(s, t, temperature)
    assert_close(ours, tutorial, F64)
    assert_close(
        grads(lambda a: soft_kl(a, t, temperature=temperature), s)[0],
        grads(lambda a: naive.kd_tutorial(a, t, temperature), s)[0],
        F64,
    )
    # and the usual F.kl_div(batchmean) * T^2 formulation, also with log_target=True
    assert_close(ours, naive.kd_kl_div(s, t, temperature), F64)
    lt = F.kl_div(
        F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1), reduction="batchmean", log_target=True
    )
    assert_close(ours, lt * temperature**2, F64)


@pytest.mark.parametrize(
    ("direction", "beta", "textbook"),
    [
        ("forward", None, lambda s, t, T, b: naive.kd_kl_div(s, t, T)),
        ("reverse", None, lambda s, t, T, b: naive.reverse_kl(s, t, T)),
        ("jsd", None, lambda s, t, T, b: naive.jsd(s, t, T, 0.5)),
        ("jsd", 0.1, lambda s, t, T, b: naive.jsd(s, t, T, b)),
        ("jsd", 0.9, lambda s, t, T, b: naive.jsd(s, t, T, b)),
    ],
)
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_matches_textbook_values_and_gradients(
    direction: str, beta: float | None, textbook, temperature: float
) -> None:  # type: ignore[no-untyped-def]
    s, t = logits_pair(5, 9, seed=3, scale=2.5)

    def ours(a: Tensor, b: Tensor) -> Tensor:
        return soft_kl(a, b, temperature=temperature, direction=direction, jsd_weight=beta)  # type: ignore[arg-type]

    def ref(a: Tensor, b: Tensor) -> Tensor:
        return textbook(a, b, temperature, beta)  # type: ignore[no-any-return]

    assert_close(ours(s, t), ref(s, t), F64)
    assert_close(grads(ours, s, t)[0], grads(ref, s, t)[0], F64)


@PROPERTY_SETTINGS
@given(pair=logit_pairs(scales=(0.3, 1.0, 3.0)), temperature=temperatures(), direction=directions(), beta=betas())
def test_property_matches_textbook_per_row(pair: LogitPair, temperature: float, direction: str, beta: float) -> None:
    b = beta if direction == "jsd" else None
    ours = soft_kl(
        pair.student, pair.teacher, temperature=temperature, reduction="none", direction=direction, jsd_weight=b
    )  # type: ignore[arg-type]
    assert_close(ours, naive.kl_rows(pair.student, pair.teacher, temperature, direction, beta), F64)


def test_teacher_gets_no_gradient_and_student_does() -> None:
    s, t = logits_pair(4, 6)
    s.requires_grad_(True)
    t.requires_grad_(True)
    for direction in DIRECTIONS:
        soft_kl(s, t, temperature=2.0, direction=direction).backward()  # type: ignore[arg-type]
        assert t.grad is None
        assert s.grad is not None
        assert s.grad.abs().sum() > 0
        s.grad = None


def test_log_probs_upcasts_and_matches_log_softmax() -> None:
    x = make_tensor(3, 5, seed=2, dtype=torch.bfloat16)
    out = log_probs(x, 2.0)
    assert out.dtype == torch.float32
    assert torch.equal(out, F.log_softmax(x.float() / 2.0, dim=-1))
    assert log_probs(x.double(), 2.0).dtype == torch.float64
    with pytest.raises(ValueError, match=r"temperature must be a finite number > 0, got 0"):
        log_probs(x, 0)
    with pytest.raises(TypeError, match=r"logits must be a floating-point tensor"):
        log_probs(torch.ones(2, 3, dtype=torch.long), 1.0)


# --------------------------------------------------------------------------------------------
# Hypothesis properties
# --------------------------------------------------------------------------------------------


@PROPERTY_SETTINGS
@given(pair=logit_pairs(), temperature=temperatures(), direction=directions(), beta=betas())
def test_property_nonnegative(pair: LogitPair, temperature: float, direction: str, beta: float) -> None:
    b = beta if direction == "jsd" else None
    rows = soft_kl(
        pair.student, pair.teacher, temperature=temperature, reduction="none", direction=direction, jsd_weight=b
    )  # type: ignore[arg-type]
    assert torch.isfinite(rows).all()
    assert (rows >= -1e-9 * temperature**2).all(), rows.min()


@PROPERTY_SETTINGS
@given(pair=logit_pairs(), temperature=temperatures(), direction=directions())
def test_property_zero_for_identical_distributions(pair: LogitPair, temperature: float, direction: str) -> None:
    rows = soft_kl(pair.student, pair.student.clone(), temperature=temperature, reduction="none", direction=direction)  # type: ignore[arg-type]
    assert_close(rows, torch.zeros_like(rows), Tol(1e-10 * temperature**2, 0))
    # same distribution from shifted logits: still zero
    shifted = pair.student + 3.25
    rows = soft_kl(pair.student, shifted, temperature=temperature, reduction="none", direction=direction)  # type: ignore[arg-type]
    assert_close(rows, torch.zeros_like(rows), Tol(1e-9 * temperature**2, 0))


@PROPERTY_SETTINGS
@given(
    pair=logit_pairs(),
    temperature=temperatures(),
    direction=directions(),
    data=st.data(),
)
def test_property_invariant_to_per_row_constant(
    pair: LogitPair, temperature: float, direction: str, data: st.DataObject
) -> None:
    rows_shape = pair.student.shape[:-1]
    c_s = data.draw(st.floats(-50, 50)) * torch.linspace(-1, 1, rows_shape.numel(), dtype=torch.float64).view(
        *rows_shape, 1
    )
    c_t = data.draw(st.floats(-50, 50)) * torch.ones(*rows_shape, 1, dtype=torch.float64)
    kw = dict(temperature=temperature, reduction="none", direction=direction)
    base = soft_kl(pair.student, pair.teacher, **kw)  # type: ignore[arg-type]
    moved = soft_kl(pair.student + c_s, pair.teacher + c_t, **kw)  # type: ignore[arg-type]
    assert_close(moved, base, Tol(1e-9 * max(1.0, temperature**2), 1e-7))


@PROPERTY_SETTINGS
@given(
    pair=logit_pairs(logit_shapes(min_classes=1)), temperature=temperatures(), direction=directions(), data=st.data()
)
def test_property_reductions_agree(pair: LogitPair, temperature: float, direction: str, data: st.DataObject) -> None:
    """none sums to sum; batchmean = sum / N (N = counted rows: B for 2-D, counted tokens for 3-D);
    mean = sum / (N C)."""
    mask = data.draw(row_masks(tuple(pair.student.shape[:-1])))
    kw = dict(temperature=temperature, direction=direction, mask=mask)
    out = {r: soft_kl(pair.student, pair.teacher, reduction=r, **kw) for r in REDUCTIONS}  # type: ignore[arg-type]
    n = int(mask.sum())
    c = pair.student.shape[-1]
    assert_close(out["none"].sum(), out["sum"], Tol(1e-10, 1e-10))
    assert (out["none"][~mask] == 0).all()
    assert_close(out["batchmean"], out["sum"] / max(n, 1), Tol(1e-12, 1e-10))
    assert_close(out["mean"], out["sum"] / max(n * c, 1), Tol(1e-12, 1e-10))
    if pair.student.ndim == 2:
        full = soft_kl(pair.student, pair.teacher, reduction="batchmean", temperature=temperature, direction=direction)  # type: ignore[arg-type]
        total = soft_kl(pair.student, pair.teacher, reduction="sum", temperature=temperature, direction=direction)  # type: ignore[arg-type]
        assert_close(full, total / pair.student.shape[0], Tol(1e-12, 1e-10))


@PROPERTY_SETTINGS
@given(pair=logit_pairs(), temperature=temperatures(), beta=betas())
def test_property_jsd_symmetric(pair: LogitPair, temperature: float, beta: float) -> None:
    kw = dict(temperature=temperature, reduction="none", direction="jsd")
    a = soft_kl(pair.student, pair.teacher, jsd_weight=0.5, **kw)  # type: ignore[arg-type]
    b = soft_kl(pair.teacher, pair.student, jsd_weight=0.5, **kw)  # type: ignore[arg-type]
    assert_close(a, b, Tol(1e-10 * max(1.0, temperature**2), 1e-8))
    # and in general, swapping the roles swaps the weights
    a = soft_kl(pair.student, pair.teacher, jsd_weight=beta, **kw)  # type: ignore[arg-type]
    b = soft_kl(pair.teacher, pair.student, jsd_weight=1.0 - beta, **kw)  # type: ignore[arg-type]
    assert_close(a, b, Tol(1e-10 * max(1.0, temperature**2), 1e-8))
    # JSD is bounded by log 2 (times T^2) per row
    assert (a <= math.log(2) * temperature**2 + 1e-9).all()


def _grad_norm(s: Tensor, t: Tensor, temperature: float, direction: str = "forward") -> float:
    (g,) = grads(lambda a: soft_kl(a, t, temperature=temperature, direction=direction), s)  # type: ignore[arg-type]
    return float(g.norm())


@PROPERTY_SETTINGS
@given(
    pair=logit_pairs(logit_shapes(min_classes=2, max_len=3), scales=(0.3, 1.0, 3.0)),
    factor=st.floats(20.0, 200.0),
    direction=directions(),
)
def test_property_t_squared_gradient_levels_off(pair: LogitPair, factor: float, direction: str) -> None:
    """With T^2 applied once the gradient tends to a non-zero limit as T grows.

    Forgetting T^2 makes it fall like 1/T^2 (ratio 1/16 between T and 4T), applying it twice makes
    it grow like T^2 (ratio 16); we accept [0.8, 1.25] once T is large against the logits.
    """
    s, t = pair.student, pair.teacher
    sc, tc = s - s.mean(-1, keepdim=True), t - t.mean(-1, keepdim=True)
    z = max(float(sc.abs().max()), float(tc.abs().max()), 0.1)
    # The limit is (1/N) centred(z_s - z_t) / C for every direction; the remainder is O(|z| / T)
    # relative to it unless z_s - z_t is nearly constant per row (then there is nothing to learn).
    assume(float((sc - tc).norm()) > 0.1 * float(sc.norm() + tc.norm()))
    temperature = factor * z
    ratio = _grad_norm(s, t, 4 * temperature, direction) / _grad_norm(s, t, temperature, direction)
    assert 0.8 < ratio < 1.25, ratio


# --------------------------------------------------------------------------------------------
# Known ways KD code breaks
# --------------------------------------------------------------------------------------------


def test_t_squared_gradient_norm_levels_off_at_the_analytic_limit() -> None:
    """T^2 forgotten (1/T^2 decay) or applied twice (T^2 growth) would both miss the limit.

    For large T, d/dz_s [T^2 KL(p||q)] = T (q - p) -> (z_s - z_t - mean) / C per row, / B for batchmean.
    """
    s, t = logits_pair(8, 10, seed=5)
    temps = [1.0, 4.0, 16.0, 64.0, 256.0, 1024.0]
    norms = [_grad_norm(s, t, temp) for temp in temps]
    d = s - t
    limit = float(((d - d.mean(-1, keepdim=True)) / (10 * 8)).norm())
    assert abs(norms[-1] / limit - 1) < 0.01
    assert abs(norms[-2] / limit - 1) < 0.04
    assert all(n > 0.3 * limit for n in norms)  # never vanishes
    # The naive form without T^2 really does vanish like 1/T^2: the bug this test is about.
    (g_forgot,) = grads(lambda a: naive.kd_kl_div(a, t, 1024.0) / 1024.0**2, s)
    assert float(g_forgot.norm()) < 1e-5 * limit


def test_zero_times_log_zero_masked_classes_are_finite_and_equal_dropping_them() -> None:
    """-inf logits (masked classes) give p = 0: the textbook p*log(p) form is NaN, soft_kl is not."""
    s, t = logits_pair(4, 6, seed=7)
    masked = torch.tensor([False, True, False, False, True, False])
    s_m, t_m = s.masked_fill(masked, INF), t.masked_fill(masked, INF)
    assert torch.isnan(naive.kd_tutorial(s_m, t_m, 2.0))
    assert torch.isnan(naive.kd_kl_div(s_m, t_m, 2.0))
    for direction in DIRECTIONS:
        for dt in (torch.float64, torch.float32, torch.bfloat16):

            def f(a: Tensor, b: Tensor, direction: str = direction) -> Tensor:
                return soft_kl(a, b, temperature=2.0, direction=direction)  # type: ignore[arg-type]

            out = f(s_m.to(dt), t_m.to(dt))
            kept = f(s[:, ~masked].to(dt), t[:, ~masked].to(dt))
            assert torch.isfinite(out)
            assert_close(out, kept, Tol(1e-6, 1e-6))
            (g,) = grads(lambda a, dt=dt: f(a, t_m.to(dt)), s_m.to(dt))
            assert torch.isfinite(g).all()
            assert (g[:, masked] == 0).all()
            assert_close(
                g[:, ~masked],
                grads(lambda a, dt=dt: f(a, t[:, ~masked].to(dt)), s[:, ~masked].to(dt))[0],
                Tol(1e-6, 1e-6),
            )


def test_teacher_only_zero_probability() -> None:
    """A class the teacher rules out (-inf) but the student does not.

    forward and JSD stay finite and match the float64 limit (0 * log 0 = 0). The reverse KL is
    mathematically infinite (q > 0 where p = 0); soft_kl returns a finite, very large value
    (log-probabilities are floored at -1e30) rather than inf or NaN.
    """
    s, t = logits_pair(3, 5, seed=8)
    t = t.clone()
    t[:, 2] = INF
    for direction in ("forward", "jsd"):
        out = soft_kl(s.float(), t.float(), direction=direction)  # type: ignore[arg-type]
        p = F.softmax(t, -1)
        q = F.softmax(s, -1)
        if direction == "forward":
            expected = (torch.xlogy(p, p) - p * q.log()).sum() / 3
        else:
            m = 0.5 * (p + q)
            expected = (
                0.5 * (torch.xlogy(p, p) - torch.xlogy(p, m)).sum() / 3 + 0.5 * (q * (q.log() - m.log())).sum() / 3
            )
        assert_close(out, expected, Tol(1e-6, 1e-6))
        (g,) = grads(lambda a, d=direction: soft_kl(a, t.float(), direction=d), s.float())  # type: ignore[arg-type]
        assert torch.isfinite(g).all()
    rev = soft_kl(s.float(), t.float(), direction="reverse")
    assert torch.isfinite(rev)
    assert rev > 1e20


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_fully_masked_rows_count_zero_and_are_not_counted(direction: str) -> None:
    """Our decision (soft_kl's docstring): a row with no distribution (all -inf), a False mask or an
    ignored label contributes 0 and is left out of batchmean's count; the gradient stays finite."""
    s, t = logits_pair(6, 5, seed=9)
    s, t = s.clone(), t.clone()
    s[1] = INF  # student row fully masked
    t[3] = INF  # teacher row fully masked
    mask = torch.tensor([True, True, True, True, False, True])
    labels = torch.tensor([0, 1, 2, 3, 4, -100])
    kw = dict(temperature=2.0, direction=direction)
    out = soft_kl(s, t, mask=mask, labels=labels, **kw)  # type: ignore[arg-type]
    good = torch.tensor([0, 2])
    assert_close(out, soft_kl(s[good], t[good], **kw), F64)  # type: ignore[arg-type]
    rows = soft_kl(s, t, mask=mask, labels=labels, reduction="none", **kw)  # type: ignore[arg-type]
    assert (rows[[1, 3, 4, 5]] == 0).all()
    assert (rows[good] > 0).all()
    (g,) = grads(lambda a: soft_kl(a, t, mask=mask, labels=labels, **kw), s)  # type: ignore[arg-type]
    assert torch.isfinite(g).all()
    assert (g[[1, 3, 4, 5]] == 0).all()

    # everything masked: 0 for every reduction, zero gradient, no NaN
    for r in REDUCTIONS:
        none = soft_kl(s, t, mask=torch.zeros(6, dtype=torch.bool), reduction=r, **kw)  # type: ignore[arg-type]
        assert (none == 0).all()
    allinf = torch.full((3, 5), INF, requires_grad=True)
    out = soft_kl(allinf, torch.zeros(3, 5), **kw)  # type: ignore[arg-type]
    out.backward()
    assert out == 0
    assert allinf.grad is not None
    assert (allinf.grad == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_naive_is_off_soft_kl_computes_in_float32(dtype: torch.dtype) -> None:
    """The textbook KL evaluated in bf16 is off by up to ~6e-2 here; soft_kl upcasts, so on bf16/fp16
    input it returns exactly the float32 computation on the same values."""
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(8, 100, generator=g) * 3).to(dtype)
    t = (torch.randn(8, 100, generator=g) * 3).to(dtype)
    exact = naive.kd_kl_div(s.double(), t.double(), 4.0)
    naive_low = naive.kd_kl_div(s, t, 4.0)
    assert naive_low.dtype == dtype
    ours = soft_kl(s, t, temperature=4.0)
    assert ours.dtype == torch.float32
    assert torch.equal(ours, soft_kl(s.float(), t.float(), temperature=4.0))
    assert_close(ours, exact, Tol(1e-5, 1e-6))
    err = abs(float(naive_low) - float(exact))
    if dtype == torch.bfloat16:
        assert err > 3e-2, err  # 6.2e-2 with this seed
    else:
        assert err > 100 * abs(float(ours) - float(exact)), err
    # gradients: computed in float32, returned in the input dtype
    (gs,) = grads(lambda a: soft_kl(a, t, temperature=4.0), s)
    (g32,) = grads(lambda a: soft_kl(a, t.float(), temperature=4.0), s.float())
    assert gs.dtype == dtype
    assert torch.equal(gs, g32.to(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_inside_autocast_region_computes_in_float32(device: str, dtype: torch.dtype) -> None:
    """Called inside torch.autocast (an AMP training step) with low-precision logits: the same
    float32 result as outside it, for every direction."""
    s, t = (x.to(device, dtype) for x in logits_pair(4, 3, 11, seed=21))
    for direction in DIRECTIONS:
        outside = soft_kl(s, t, temperature=2.0, direction=direction)  # type: ignore[arg-type]
        with torch.autocast(device_type=device, dtype=dtype):
            inside = soft_kl(s, t, temperature=2.0, direction=direction)  # type: ignore[arg-type]
        assert inside.dtype == torch.float32
        assert_close(inside, outside, Tol(1e-6, 1e-6), msg=direction)


def test_kl_div_broadcasts_silently_soft_kl_raises() -> None:
    """F.kl_div accepts a (4, 5) input against a (5,) target and broadcasts; soft_kl refuses."""
    s = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    t = torch.randn(5, generator=torch.Generator().manual_seed(1))
    silently = F.kl_div(F.log_softmax(s, -1), F.softmax(t, -1), reduction="batchmean")
    broadcast = F.kl_div(F.log_softmax(s, -1), F.softmax(t, -1).expand(4, 5), reduction="batchmean")
    assert torch.isfinite(silently)
    assert torch.equal(silently, broadcast)
    with pytest.raises(
        ShapeError, match=r"student_logits and teacher_logits must have the same shape, got \(4, 5\) and \(5,\)"
    ):
        soft_kl(s, t)
    with pytest.raises(ShapeError, match=r"got \(5,\) and \(4, 5\)"):
        soft_kl(t, s)
    with pytest.raises(ShapeError, match=r"got \(4, 5\) and \(1, 5\) \(batch size 4 vs 1\)"):
        soft_kl(s, t[None])


def test_batchmean_on_sequences_divides_by_counted_positions() -> None:
    """(B, L, C): batchmean divides by the number of counted positions, not by B as F.kl_div does,
    and equals the 2-D batchmean of the flattened (counted) rows."""
    s, t = logits_pair(3, 4, 7, seed=12)
    mask = seq_mask()  # 8 of 12 positions count
    total = soft_kl(s, t, temperature=2.0, reduction="sum", mask=mask)
    bm = soft_kl(s, t, temperature=2.0, reduction="batchmean", mask=mask)
    assert_close(bm, total / 8, F64)
    assert_close(bm, soft_kl(s[mask], t[mask], temperature=2.0, reduction="batchmean"), F64)
    # without a mask: N = B * L
    bm = soft_kl(s, t, temperature=2.0)
    assert_close(bm, soft_kl(s.flatten(0, 1), t.flatten(0, 1), temperature=2.0), F64)
    # F.kl_div's batchmean divides by B = 3 only, so it is L = 4 times ours
    t_sq = 2.0**2
    kl_div = F.kl_div(F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1), reduction="batchmean", log_target=True)
    length = s.shape[1]
    assert_close(kl_div * t_sq, bm * length, F64)
    # labels with ignore_index count the same way
    labels = torch.where(mask, 1, -1)
    assert_close(soft_kl(s, t, temperature=2.0, labels=labels, ignore_index=-1), total / 8, F64)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_non_contiguous_inputs(direction: str) -> None:
    kw = dict(temperature=3.0, direction=direction)
    base = make_tensor(7, 10, seed=13, scale=2.0)
    other = make_tensor(10, 7, seed=14, scale=2.0)
    cases = {
        "transposed": (base[:, :7].contiguous(), other[:7].t()),  # (7, 7) teacher transposed
        "sliced": (base[:, ::2], other.t()[:, 1::2]),  # stride 2 on the class dimension
        "expanded": (base[:4], make_tensor(1, 10, seed=20).expand(4, 10)),  # stride 0 on the batch
        "permuted_3d": (make_tensor(4, 2, 5, seed=15).permute(1, 0, 2), make_tensor(2, 5, 4, seed=16).permute(0, 2, 1)),
    }
    for name, (s, t) in cases.items():
        assert not (s.is_contiguous() and t.is_contiguous()), name
        out = soft_kl(s, t, **kw)  # type: ignore[arg-type]
        assert_close(out, soft_kl(s.contiguous(), t.contiguous(), **kw), Tol(1e-12, 1e-12), msg=name)  # type: ignore[arg-type]
        (g,) = grads(lambda a, t=t: soft_kl(a, t, **kw), s)  # type: ignore[arg-type]
        (gc,) = grads(lambda a, t=t: soft_kl(a, t.contiguous(), **kw), s.contiguous())  # type: ignore[arg-type]
        assert_close(g, gc, Tol(1e-12, 1e-12), msg=name)


# --------------------------------------------------------------------------------------------
# Edge cases: empty batch, extreme logits
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(0, 5), (0, 3, 5), (2, 0, 5)])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_empty_batch(shape: tuple[int, ...], direction: str, reduction: str) -> None:
    s = torch.zeros(shape, requires_grad=True)
    out = soft_kl(s, torch.zeros(shape), temperature=2.0, reduction=reduction, direction=direction)  # type: ignore[arg-type]
    if reduction == "none":
        assert out.shape == shape[:-1]
    else:
        assert out.shape == ()
        assert out.item() == 0.0
    out.sum().backward()
    assert s.grad is not None
    assert s.grad.shape == shape
    module = KDLoss(2.0, reduction=reduction, direction=direction)  # type: ignore[arg-type]
    assert torch.equal(module(s, torch.zeros(shape)), out)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_extreme_logits_stay_finite(dtype: torch.dtype, temperature: float, direction: str) -> None:
    """Logits of +-100 (saturated softmax) and -inf in masked classes: finite values and gradients,
    equal to the loss on the unmasked classes computed in float64."""
    s = torch.tensor([[100.0, -100.0, 0.0, INF], [-100.0, 100.0, 50.0, INF], [100.0, 100.0, -100.0, INF]])
    t = torch.tensor([[-100.0, 100.0, 0.0, INF], [-100.0, 100.0, 50.0, INF], [100.0, -100.0, 100.0, INF]])

    def f(a: Tensor, b: Tensor) -> Tensor:
        return soft_kl(a, b, temperature=temperature, direction=direction, reduction="sum")  # type: ignore[arg-type]

    out = f(s.to(dtype), t.to(dtype))
    assert torch.isfinite(out)
    # float64 reference on the 3 unmasked classes, textbook form
    ref = naive.kl_rows(s[:, :3].double(), t[:, :3].double(), temperature, direction).sum()
    assert_close(out, ref, Tol(1e-4, 1e-5))
    (g,) = grads(lambda a: f(a, t.to(dtype)), s.to(dtype))
    assert torch.isfinite(g).all()
    assert (g[:, 3] == 0).all()
    (g_ref,) = grads(lambda a: naive.kl_rows(a, t[:, :3].double(), temperature, direction).sum(), s[:, :3].double())
    assert_close(g[:, :3], g_ref, Tol(1e-4, 2e-2))


# --------------------------------------------------------------------------------------------
# gradcheck, compile
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(direction="forward", reduction="batchmean"),
        dict(direction="reverse", reduction="none"),
        dict(direction="jsd", jsd_weight=0.3, reduction="mean"),
        dict(direction="forward", reduction="sum", temperature=0.5),
    ],
    ids=["forward", "reverse", "jsd", "forward-T0.5"],
)
def test_gradcheck_float64(kwargs: dict[str, object]) -> None:
    s, t = logits_pair(2, 3, 4, seed=17)
    mask = torch.tensor([[True, False, True], [True, True, True]])
    kwargs = {"temperature": 2.0, **kwargs}
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: soft_kl(a, t, mask=mask, **kwargs), (s,))  # type: ignore[arg-type]


@pytest.mark.slow
def test_compile_fullgraph_matches_eager() -> None:
    """One compile for the whole family: forward/reverse/JSD, a mask and labels, in one graph.

    Inductor (C++ kernels on CPU), forward and backward, ``dynamic=True``: the same graph serves a
    second batch size and a second temperature (a temperature schedule, a smaller last batch).
    Slow on a cold cache: the first inductor compile in a process sets up the C++ toolchain
    (15-20 s of CPU in all; ~4 s with a warm cache).
    """

    def family(s: Tensor, t: Tensor, mask: Tensor, labels: Tensor, temperature: float) -> Tensor:
        return torch.stack(
            [
                soft_kl(s, t, temperature=temperature, mask=mask),
                soft_kl(s, t, temperature=temperature, direction="reverse", reduction="sum", labels=labels),
                soft_kl(s, t, temperature=temperature, direction="jsd", jsd_weight=0.3, reduction="mean"),
            ]
        )

    calls = []
    for b, temperature in ((2, 2.0), (3, 4.5)):
        s, t = logits_pair(b, 3, 5, seed=18 + b, dtype=torch.float32)
        t[0, 0, 1] = INF
        labels = torch.tensor([[1, -100, 2], [0, 0, -100], [3, -100, 4]])[:b]
        calls.append((s, t, seq_mask()[:b, :3], labels, temperature))
    compiled = assert_compiled_matches_eager(family, calls, Tol(1e-5, 1e-5))
    # A bad input still fails with our message (dynamo wraps it under fullgraph=True).
    s, t, mask, labels, _ = calls[0]
    with pytest.raises((ValueError, RuntimeError), match=r"temperature must be a finite number > 0, got -1.0"):
        compiled(s, t, mask, labels, -1.0)
    with pytest.raises((ValueError, RuntimeError), match=r"\(class count 5 vs 4\)"):
        compiled(s, t[..., :4], mask, labels, 2.0)


# --------------------------------------------------------------------------------------------
# The module: == function, round trips, repr
# --------------------------------------------------------------------------------------------

MODULE_CONFIGS = [
    dict(),
    dict(temperature=4.0),
    dict(temperature=2.0, reduction="sum", direction="reverse"),
    dict(temperature=3.0, reduction="none", direction="jsd", jsd_weight=0.25),
    dict(temperature=1.5, reduction="mean", ignore_index=-1),
]


@pytest.mark.parametrize(
    "config", MODULE_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default"
)
def test_module_equals_function_and_round_trips(config: dict[str, object]) -> None:
    s, t = logits_pair(3, 4, 6, seed=19)
    mask = seq_mask()
    labels = torch.tensor([[0, -1, 2, 3], [-100, 1, 1, 1], [2, 2, -1, 0]])
    module = KDLoss(**config)  # type: ignore[arg-type]
    fn_kwargs = {k: v for k, v in config.items()}
    for inputs in (dict(), dict(mask=mask), dict(labels=labels), dict(mask=mask, labels=labels)):
        expected = soft_kl(s, t, **fn_kwargs, **inputs)  # type: ignore[arg-type]
        assert torch.equal(module(s, t, **inputs), expected)
        assert_close(
            grads(lambda a, i=inputs: module(a, t, **i), s)[0],
            grads(lambda a, i=inputs: soft_kl(a, t, **fn_kwargs, **i), s)[0],
            Tol(0, 0),
        )  # type: ignore[arg-type]
    assert list(module.parameters()) == []
    assert list(module.buffers()) == []
    assert module.state_dict() == {}
    assert_state_dict_roundtrip(module, KDLoss())
    for how, clone in roundtrip_module(module):
        assert type(clone) is KDLoss, how
        assert repr(clone) == repr(module), how
        assert torch.equal(clone(s, t, mask=mask), module(s, t, mask=mask)), how


def test_module_repr() -> None:
    assert repr(KDLoss()) == "KDLoss(temperature=1.0, reduction='batchmean', direction='forward')"
    assert (
        repr(KDLoss(4, reduction="sum", direction="reverse"))
        == "KDLoss(temperature=4.0, reduction='sum', direction='reverse')"
    )
    assert (
        repr(KDLoss(2.0, direction="jsd", jsd_weight=0.3))
        == "KDLoss(temperature=2.0, reduction='batchmean', direction='jsd', jsd_weight=0.3)"
    )
    assert (
        repr(KDLoss(ignore_index=0))
        == "KDLoss(temperature=1.0, reduction='batchmean', direction='forward', ignore_index=0)"
    )


# --------------------------------------------------------------------------------------------
# Error paths
# --------------------------------------------------------------------------------------------

Z = torch.zeros(4, 5)
Z3 = torch.zeros(2, 3, 5)
META = torch.zeros(4, 5, device="meta")

FUNCTION_ERRORS = [
    (
        "batch",
        lambda: soft_kl(Z, torch.zeros(3, 5)),
        ShapeError,
        r"same shape, got \(4, 5\) and \(3, 5\) \(batch size 4 vs 3\)",
    ),
    (
        "classes",
        lambda: soft_kl(Z, torch.zeros(4, 6)),
        ShapeError,
        r"same shape, got \(4, 5\) and \(4, 6\) \(class count 5 vs 6\)",
    ),
    ("classes-3d", lambda: soft_kl(Z3, torch.zeros(2, 3, 4)), ShapeError, r"\(class count 5 vs 4\)"),
    ("length-3d", lambda: soft_kl(Z3, torch.zeros(2, 4, 5)), ShapeError, r"got \(2, 3, 5\) and \(2, 4, 5\)"),
    ("ndim", lambda: soft_kl(Z3, Z), ShapeError, r"got \(2, 3, 5\) and \(4, 5\)"),
    (
        "1-d",
        lambda: soft_kl(torch.zeros(5), torch.zeros(5)),
        ShapeError,
        r"student_logits must have at least 2 dimensions.*got shape \(5,\)",
    ),
    ("T=0", lambda: soft_kl(Z, Z, temperature=0.0), ValueError, r"temperature must be a finite number > 0, got 0.0"),
    ("T<0", lambda: soft_kl(Z, Z, temperature=-2), ValueError, r"temperature must be a finite number > 0, got -2"),
    (
        "T=nan",
        lambda: soft_kl(Z, Z, temperature=float("nan")),
        ValueError,
        r"temperature must be a finite number > 0, got nan",
    ),
    (
        "T=inf",
        lambda: soft_kl(Z, Z, temperature=float("inf")),
        ValueError,
        r"temperature must be a finite number > 0, got inf",
    ),
    ("T=str", lambda: soft_kl(Z, Z, temperature="4"), TypeError, r"temperature must be a positive number, got str '4'"),
    (
        "T=bool",
        lambda: soft_kl(Z, Z, temperature=True),
        TypeError,
        r"temperature must be a positive number, got bool True",
    ),
    (
        "int-student",
        lambda: soft_kl(Z.long(), Z),
        TypeError,
        r"student_logits must be a floating-point tensor .*got dtype torch.int64",
    ),
    (
        "int-teacher",
        lambda: soft_kl(Z, Z.int()),
        TypeError,
        r"teacher_logits must be a floating-point tensor .*got dtype torch.int32",
    ),
    (
        "bool-logits",
        lambda: soft_kl(Z.bool(), Z),
        TypeError,
        r"student_logits must be a floating-point tensor .*got dtype torch.bool",
    ),
    ("list", lambda: soft_kl([[0.0, 1.0]], Z), TypeError, r"student_logits must be a torch.Tensor, got list"),
    (
        "device",
        lambda: soft_kl(Z, META),
        ValueError,
        r"student_logits and teacher_logits must be on the same device, got cpu and meta",
    ),
    ("device-rev", lambda: soft_kl(META, Z), ValueError, r"must be on the same device, got meta and cpu"),
    (
        "jsd_weight-fwd",
        lambda: soft_kl(Z, Z, jsd_weight=0.5),
        ValueError,
        r"jsd_weight is the JSD mixture weight and needs direction='jsd', got direction='forward'",
    ),
    (
        "jsd_weight-rev",
        lambda: soft_kl(Z, Z, jsd_weight=0.5, direction="reverse"),
        ValueError,
        r"needs direction='jsd', got direction='reverse'",
    ),
    (
        "jsd_weight=0",
        lambda: soft_kl(Z, Z, jsd_weight=0.0, direction="jsd"),
        ValueError,
        r"jsd_weight must lie in \(0, 1\), got 0.0",
    ),
    (
        "jsd_weight=1",
        lambda: soft_kl(Z, Z, jsd_weight=1, direction="jsd"),
        ValueError,
        r"jsd_weight must lie in \(0, 1\), got 1",
    ),
    (
        "jsd_weight=str",
        lambda: soft_kl(Z, Z, jsd_weight="a", direction="jsd"),
        TypeError,
        r"jsd_weight must be a number in \[0, 1\], got str 'a'",
    ),
    (
        "reduction",
        lambda: soft_kl(Z, Z, reduction="avg"),
        ValueError,
        r"reduction must be one of 'none', 'mean', 'batchmean', 'sum', got 'avg'",
    ),
    (
        "direction",
        lambda: soft_kl(Z, Z, direction="backward"),
        ValueError,
        r"direction must be one of 'forward', 'reverse', 'jsd', got 'backward'",
    ),
    (
        "mask-shape",
        lambda: soft_kl(Z, Z, mask=torch.ones(4, 5, dtype=torch.bool)),
        ShapeError,
        r"mask must have the logits' shape without the class dimension, \(4,\), got \(4, 5\)",
    ),
    (
        "mask-shape-3d",
        lambda: soft_kl(Z3, Z3, mask=torch.ones(2, dtype=torch.bool)),
        ShapeError,
        r"mask must have .*\(2, 3\), got \(2,\)",
    ),
    (
        "mask-dtype",
        lambda: soft_kl(Z, Z, mask=torch.ones(4)),
        TypeError,
        r"mask must be a bool tensor, got dtype torch.float32",
    ),
    (
        "mask-int",
        lambda: soft_kl(Z, Z, mask=torch.ones(4, dtype=torch.long)),
        TypeError,
        r"mask must be a bool tensor, got dtype torch.int64",
    ),
    (
        "mask-device",
        lambda: soft_kl(Z, Z, mask=torch.ones(4, dtype=torch.bool, device="meta")),
        ValueError,
        r"mask must be on the logits' device cpu, got meta",
    ),
    (
        "labels-shape",
        lambda: soft_kl(Z3, Z3, labels=torch.zeros(3, 2, dtype=torch.long)),
        ShapeError,
        r"labels must have .*\(2, 3\), got \(3, 2\)",
    ),
    (
        "labels-float",
        lambda: soft_kl(Z, Z, labels=torch.zeros(4)),
        TypeError,
        r"labels must be an integer tensor, got dtype torch.float32",
    ),
    (
        "labels-bool",
        lambda: soft_kl(Z, Z, labels=torch.zeros(4, dtype=torch.bool)),
        TypeError,
        r"labels must be an integer tensor, got dtype torch.bool",
    ),
    (
        "labels-device",
        lambda: soft_kl(Z, Z, labels=torch.zeros(4, dtype=torch.long, device="meta")),
        ValueError,
        r"labels must be on the logits' device cpu, got meta",
    ),
    (
        "ignore_index",
        lambda: soft_kl(Z, Z, labels=torch.zeros(4, dtype=torch.long), ignore_index=None),
        TypeError,
        r"ignore_index must be an int, got NoneType None",
    ),
]


@pytest.mark.parametrize(
    ("call", "error", "match"), [c[1:] for c in FUNCTION_ERRORS], ids=[c[0] for c in FUNCTION_ERRORS]
)
def test_function_errors(call, error: type[Exception], match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=match):
        call()


MODULE_ERRORS = [
    ("T=0", dict(temperature=0), ValueError, r"temperature must be a finite number > 0, got 0"),
    ("T=-1", dict(temperature=-1.0), ValueError, r"temperature must be a finite number > 0, got -1.0"),
    (
        "reduction",
        dict(reduction="elementwise_mean"),
        ValueError,
        r"reduction must be one of .* got 'elementwise_mean'",
    ),
    ("direction", dict(direction="kl"), ValueError, r"direction must be one of 'forward', 'reverse', 'jsd', got 'kl'"),
    (
        "jsd_weight-no-jsd",
        dict(jsd_weight=0.5),
        ValueError,
        r"jsd_weight is the JSD mixture weight and needs direction='jsd', got direction='forward'",
    ),
    (
        "jsd_weight-range",
        dict(direction="jsd", jsd_weight=1.5),
        ValueError,
        r"jsd_weight must lie in \(0, 1\), got 1.5",
    ),
    ("ignore_index", dict(ignore_index=-1.0), TypeError, r"ignore_index must be an int, got float -1.0"),
]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"), [c[1:] for c in MODULE_ERRORS], ids=[c[0] for c in MODULE_ERRORS]
)
def test_module_errors_at_construction(kwargs: dict[str, object], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        KDLoss(**kwargs)  # type: ignore[arg-type]


def test_module_errors_at_call() -> None:
    loss = KDLoss(2.0)
    with pytest.raises(ShapeError, match=r"\(class count 5 vs 6\)"):
        loss(Z, torch.zeros(4, 6))
    with pytest.raises(TypeError, match=r"student_logits must be a floating-point tensor"):
        loss(Z.long(), Z)
    with pytest.raises(ValueError, match=r"must be on the same device, got cpu and meta"):
        loss(Z, META)
    with pytest.raises(TypeError, match=r"mask must be a bool tensor"):
        loss(Z, Z, mask=torch.ones(4))


def test_beta_is_the_former_name_of_jsd_weight() -> None:
    s, t = logits_pair(3, 5, seed=23)
    want = soft_kl(s, t, temperature=2.0, direction="jsd", jsd_weight=0.3)
    with pytest.warns(FutureWarning, match=r"soft_kl: beta= is deprecated, pass jsd_weight= \(same meaning\)") as rec:
        got = soft_kl(s, t, temperature=2.0, direction="jsd", beta=0.3)
    assert rec[0].filename == __file__  # the warning points at the caller's line
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.warns(FutureWarning, match="KDLoss: beta= is deprecated"):
        module = KDLoss(2.0, direction="jsd", beta=0.3)
    assert (module.jsd_weight, module.beta) == (0.3, 0.3)
    assert repr(module) == "KDLoss(temperature=2.0, reduction='batchmean', direction='jsd', jsd_weight=0.3)"
    torch.testing.assert_close(module(s, t), want, rtol=0, atol=0)
    with pytest.raises(TypeError, match=r"got jsd_weight=0.3 and its former name beta=0.4: pass jsd_weight= only"):
        soft_kl(s, t, direction="jsd", jsd_weight=0.3, beta=0.4)
    with (
        pytest.raises(ValueError, match="jsd_weight is the JSD mixture weight and needs direction='jsd'"),
        pytest.warns(FutureWarning),
    ):
        KDLoss(beta=0.3)
