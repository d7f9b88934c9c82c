"""The eager Functions of ``kdloss.functional._autograd``: both forms agree, their analytic backwards are
exact (gradcheck), double backward works, and they compile and run under autocast."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

import kdloss.functional as KF
from kdloss.functional import _autograd as A
from kdloss.kernels import _selfcheck
from tests.helpers import compile_fullgraph

F64 = torch.float64
INF = float("-inf")


def _pair(
    b: int = 5, c: int = 7, seed: int = 0, dtype: torch.dtype = F64, lead: tuple[int, ...] = ()
) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(*lead, b, c, generator=g, dtype=F64) * 2).to(dtype)
    t = (torch.randn(*lead, b, c, generator=g, dtype=F64) * 2).to(dtype)
    return s, t


def _labels(b: int, c: int, seed: int = 1, lead: tuple[int, ...] = ()) -> Tensor:
    return torch.randint(0, c, (*lead, b), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def robust_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(A, "PLAIN_FIRST", False)


def _value_and_grad(fn: Callable[[Tensor], Tensor], s: Tensor) -> tuple[Tensor, Tensor]:
    leaf = s.detach().clone().requires_grad_(True)
    out = fn(leaf)
    (g,) = torch.autograd.grad(
        (out * torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).view(out.shape)).sum(), leaf
    )
    return out.detach(), g


KL_CALLS = {
    "forward": lambda s, t, r: KF.soft_kl(s, t, temperature=3.0, reduction=r),
    "reverse": lambda s, t, r: KF.soft_kl(s, t, temperature=3.0, reduction=r, direction="reverse"),
    "jsd": lambda s, t, r: KF.soft_kl(s, t, temperature=0.5, reduction=r, direction="jsd", jsd_weight=0.3),
    "kd_ce": lambda s, t, r: KF.kd_ce_loss(
        s,
        t,
        _labels(s.shape[-2], s.shape[-1], lead=s.shape[:-2]),
        alpha=0.7,
        temperature=2.0,
        reduction=r if r != "mean" else "sum",
    ),
}


@pytest.mark.parametrize("call", sorted(KL_CALLS))
@pytest.mark.parametrize("reduction", ["none", "sum", "batchmean", "mean"])
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lead", [(), (3,)], ids=["2d", "3d"])
def test_plain_and_robust_forms_agree(
    monkeypatch: pytest.MonkeyPatch, call: str, reduction: str, dtype: torch.dtype, lead: tuple[int, ...]
) -> None:
    """On CPU the plain form runs first; the robust form (CUDA, compile, masks) gives the same numbers."""
    s, t = _pair(dtype=dtype, lead=lead)
    fn = KL_CALLS[call]
    plain = _value_and_grad(lambda a: fn(a, t, reduction), s)
    monkeypatch.setattr(A, "PLAIN_FIRST", False)
    robust = _value_and_grad(lambda a: fn(a, t, reduction), s)
    tol = {F64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(plain[0], robust[0], rtol=tol, atol=tol)
    torch.testing.assert_close(plain[1], robust[1], rtol=tol, atol=tol)
    assert plain[0].dtype == (F64 if dtype == F64 else torch.float32)
    assert plain[1].dtype == dtype


@pytest.mark.parametrize("call", sorted(KL_CALLS))
def test_the_plain_form_hands_non_finite_inputs_to_the_robust_one(monkeypatch: pytest.MonkeyPatch, call: str) -> None:
    """A -inf class, a row without a distribution: the CPU call gives exactly what the robust form gives."""
    s, t = _pair()
    s, t = s.clone(), t.clone()
    s[0, 2] = t[0, 2] = INF  # a class ruled out by both
    t[1, 4] = INF  # a class the teacher rules out
    t[3] = INF  # a teacher row without a distribution
    fn = KL_CALLS[call]
    got = _value_and_grad(lambda a: fn(a, t, "none"), s)
    monkeypatch.setattr(A, "PLAIN_FIRST", False)
    want = _value_and_grad(lambda a: fn(a, t, "none"), s)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
    assert got[0][3] == 0
    assert (got[1][3] == 0).all()
    assert torch.isfinite(got[1]).all()


def _kl_family_grad(form: str) -> Callable[..., Tensor]:
    def fn(s: Tensor, t: Tensor, **kw: object) -> Tensor:
        return A.kl_family(s, t, **kw)  # type: ignore[arg-type]

    return fn


@pytest.mark.parametrize("direction", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("form", ["plain", "robust"])
def test_kl_family_gradcheck_and_double_backward(monkeypatch: pytest.MonkeyPatch, direction: str, form: str) -> None:
    if form == "robust":
        monkeypatch.setattr(A, "PLAIN_FIRST", False)
    s, t = _pair(4, 5, seed=3)
    row_ok = None
    if form == "robust":  # (the plain form would hand these to the robust one anyway)
        s, t = s.clone(), t.clone()
        s[1, 2] = t[1, 2] = INF  # a class ruled out by both: finite in every direction
        row_ok = torch.tensor([True, True, False, True])
    y = _labels(4, 5)
    kw = dict(temperature=2.0, direction=direction, jsd_weight=0.4, reduction="batchmean", row_ok=row_ok)
    s = s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: A.kl_family(a, t, **kw), (s,))  # type: ignore[arg-type]
    assert torch.autograd.gradgradcheck(lambda a: A.kl_family(a, t, **kw), (s,))  # type: ignore[arg-type]
    kw_ce = dict(temperature=2.0, labels=y, kl_weight=0.6, ce_weight=0.4, reduction="none", row_ok=row_ok)
    assert torch.autograd.gradcheck(lambda a: A.kl_family(a, t, **kw_ce), (s,))  # type: ignore[arg-type]
    assert torch.autograd.gradgradcheck(lambda a: A.kl_family(a, t, **kw_ce), (s,))  # type: ignore[arg-type]


def test_backward_can_run_twice_with_retain_graph() -> None:
    """The analytic backward does not consume what it saved (unlike the fused kernel's in-place scaling)."""
    s, t = _pair(dtype=torch.float32)
    s.requires_grad_(True)
    loss = KF.soft_kl(s, t, temperature=2.0) + KF.dkd_loss(s, t, _labels(5, 7))
    (g1,) = torch.autograd.grad(loss, s, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, s)
    assert torch.equal(g1, g2)


FEATURE_CALLS: dict[str, tuple[Callable[..., Tensor], Callable[[], tuple[Tensor, ...]]]] = {
    "dkd": (
        lambda s, t: KF.dkd_loss(s, t, _labels(4, 6), alpha=0.7, beta=3.0, temperature=2.0),
        lambda: _pair(4, 6, seed=5),
    ),
    "dkd none": (
        lambda s, t: KF.dkd_loss(s, t, _labels(4, 6), reduction="none"),
        lambda: _pair(4, 6, seed=6),
    ),
    "attention": (
        lambda s, t: KF.attention_loss([s, s[:, :2]], [t, t[:, 1:]], beta=3.0, reduction="none"),
        lambda: (torch.randn(3, 4, 3, 5, dtype=F64), torch.randn(3, 5, 3, 5, dtype=F64)),
    ),
    "ft repdistiller": (
        lambda s, t: KF.ft_loss(s, t, variant="repdistiller", reduction="mean"),
        lambda: (torch.randn(3, 4, 3, 3, dtype=F64), torch.randn(3, 2, 3, 3, dtype=F64)),
    ),
    "ft repdistiller p=2": (
        lambda s, t: KF.ft_loss(s, t, variant="repdistiller", p=2, reduction="none"),
        lambda: (torch.randn(3, 4, 3, 3, dtype=F64), torch.randn(3, 2, 3, 3, dtype=F64)),
    ),
    "ft paper": (
        lambda s, t: KF.ft_loss(s, t),
        lambda: (torch.randn(3, 4, 2, 2, dtype=F64), torch.randn(3, 4, 2, 2, dtype=F64)),
    ),
    "ft paper p=2": (
        lambda s, t: KF.ft_loss(s, t, p=2, reduction="none"),
        lambda: (torch.randn(3, 6, dtype=F64), torch.randn(3, 6, dtype=F64)),
    ),
    "cc repdistiller": (
        lambda s, t: KF.cc_loss(s, t, variant="repdistiller"),
        lambda: (torch.randn(5, 4, dtype=F64), torch.randn(5, 4, dtype=F64)),
    ),
    "pkt": (
        lambda s, t: KF.pkt_loss(s, t),
        lambda: (torch.randn(5, 4, dtype=F64), torch.randn(5, 3, dtype=F64)),
    ),
    "pkt none": (
        lambda s, t: KF.pkt_loss(s, t, reduction="none", eps=1e-3),
        lambda: (torch.randn(5, 4, dtype=F64), torch.randn(5, 3, dtype=F64)),
    ),
    "ab": (
        lambda s, t: KF.ab_loss(s, t, margin=0.5),
        lambda: (torch.randn(3, 4, 2, 2, dtype=F64), torch.randn(3, 4, 2, 2, dtype=F64)),
    ),
    "vid": (
        lambda s, t: KF.vid_loss(s, t, torch.linspace(0.5, 2.0, 4, dtype=F64)),
        lambda: (torch.randn(3, 4, 2, 2, dtype=F64), torch.randn(3, 4, 2, 2, dtype=F64)),
    ),
}


@pytest.mark.parametrize("name", sorted(FEATURE_CALLS))
def test_function_gradcheck_and_double_backward(name: str) -> None:
    fn, make = FEATURE_CALLS[name]
    s, t = make()
    s = s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: fn(a, t), (s,))
    assert torch.autograd.gradgradcheck(lambda a: fn(a, t), (s,))


def test_vid_variance_gradient() -> None:
    mu, t = torch.randn(3, 4, 2, 2, dtype=F64), torch.randn(3, 4, 2, 2, dtype=F64)
    var = torch.linspace(0.5, 2.0, 4, dtype=F64).requires_grad_(True)
    for reduction in ("mean", "sum", "batchmean"):

        def fn(m: Tensor, v: Tensor, reduction: str = reduction) -> Tensor:
            return KF.vid_loss(m, t, v, reduction=reduction)  # type: ignore[arg-type]

        assert torch.autograd.gradcheck(fn, (mu.requires_grad_(), var))
        assert torch.autograd.gradgradcheck(fn, (mu, var))


COMPILED: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "soft_kl": lambda s, t: KF.soft_kl(s, t, temperature=2.0) + KF.soft_kl(s, t, temperature=3.0, direction="jsd"),
    "kd_ce": lambda s, t: KF.kd_ce_loss(s, t, t.argmax(-1), alpha=0.3, temperature=2.0),
    "dkd": lambda s, t: KF.dkd_loss(s, t, t.argmax(-1)),
    "features": lambda s, t: (
        KF.attention_loss(s.view(-1, 2, 1, 3), t.view(-1, 2, 1, 3))
        + KF.ab_loss(s, t)
        + KF.vid_loss(s.view(-1, 3, 2), t.view(-1, 3, 2), torch.ones(3))
        + KF.ft_loss(s.view(-1, 2, 3, 1), t.view(-1, 2, 3, 1), variant="repdistiller")
        + KF.ft_loss(s, t)
        + KF.pkt_loss(s, t)
    ),
}


@pytest.mark.parametrize("name", sorted(COMPILED))
def test_functions_compile_fullgraph(name: str) -> None:
    """dynamo traces the Functions (forward and backward) without a graph break; values and gradients agree."""
    fn = COMPILED[name]
    compiled = compile_fullgraph(fn, backend="aot_eager", dynamic=True)  # symbolic sizes and floats
    for batch in (4, 5):
        s, t = _pair(batch, 6, seed=7, dtype=torch.float32)
        got = _value_and_grad(lambda a: compiled(a, t), s)  # type: ignore[arg-type, return-value]  # noqa: B023
        want = _value_and_grad(lambda a: fn(a, t), s)  # noqa: B023
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "fn",
    [
        lambda s, t: KF.soft_kl(s, t, temperature=2.0),
        lambda s, t: KF.kd_ce_loss(s, t, t.argmax(-1), alpha=0.5),
        lambda s, t: KF.dkd_loss(s, t, t.argmax(-1)),
    ],
    ids=["soft_kl", "kd_ce", "dkd"],
)
def test_functions_under_cpu_autocast_compute_in_float32(fn: Callable[[Tensor, Tensor], Tensor]) -> None:
    """Inside an autocast region the logits arrive in bfloat16; the loss is float32, the gradient bfloat16."""
    s, t = _pair(6, 9, seed=8, dtype=torch.float32)
    layer = torch.nn.Linear(9, 9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = layer(s)
        zt = layer(t).detach()
        assert z.dtype == torch.bfloat16
        loss = fn(z, zt)
    assert loss.dtype == torch.float32
    (g,) = torch.autograd.grad(loss, z)
    assert g.dtype == torch.bfloat16
    ref = fn(z.detach().double().requires_grad_(True), zt.double())
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)


def test_the_self_check_reference_is_independent_of_the_functions(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernels' self-check compares against its own written-out formulas, not the Function it could
    share a bug with: with the Function broken, the self-check's reference still computes the loss."""

    def broken(*args: object, **kwargs: object) -> Tensor:
        raise AssertionError("the self-check must not call the eager Function")

    monkeypatch.setattr(A._KLFamily, "apply", broken)
    monkeypatch.setattr(A, "_kl_forward", broken)  # what the Function and the no-graph path compute
    s, t = _pair(3, 4, dtype=torch.float32)
    rows, valid = _selfcheck.kd_rows_reference(
        s, t, temperature=2.0, labels=_labels(3, 4), kl_weight=0.5, ce_weight=0.5
    )
    want = (
        0.5
        * 4.0
        * (F_kl := (torch.softmax(t / 2, -1) * (torch.log_softmax(t / 2, -1) - torch.log_softmax(s / 2, -1))).sum(-1))
    )
    want = want + 0.5 * torch.nn.functional.cross_entropy(s, _labels(3, 4), reduction="none")
    torch.testing.assert_close(rows, want)
    assert valid.all()
    assert F_kl.shape == (3,)
    with pytest.raises(AssertionError, match="must not call"):
        KF.soft_kl(s, t)
    with pytest.raises(AssertionError, match="must not call"):
        KF.soft_kl(s.requires_grad_(), t)


@pytest.mark.parametrize("direction", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("reduction", ["sum", "batchmean", "mean"])
@pytest.mark.parametrize("lead", [(), (2,)], ids=["2d", "3d"])
def test_plain_kl_plus_ce_backward_is_exact(direction: str, reduction: str, lead: tuple[int, ...]) -> None:
    """The plain form's KL + CE backward (nll_loss's and log-softmax's backward, the KL kernel added by
    one addcmul) is the gradient of its forward, in every direction and scalar reduction."""
    s, t = _pair(4, 5, seed=5, lead=lead)
    y = _labels(4, 5, seed=6, lead=lead)
    kw = dict(
        temperature=2.0,
        direction=direction,
        jsd_weight=0.4,
        reduction=reduction,
        labels=y,
        kl_weight=0.6,
        ce_weight=0.4,
        plain_labels=True,
    )
    s = s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: A.kl_family(a, t, **kw), (s,))  # type: ignore[arg-type]
    ref = A.kl_family_reference(
        s, t, None, y, 2.0, 0.4, 0.6, 0.4, (A._DIRECTIONS[direction], 0, True, True, True, False)
    )
    per = s.shape[-1] if reduction == "mean" else 1
    want = ref.sum() / ({"sum": 1, "batchmean": ref.numel(), "mean": ref.numel() * per}[reduction])
    torch.testing.assert_close(A.kl_family(s, t, **kw), want)  # type: ignore[arg-type]


def test_cached_constants_are_plain_cpu_tensors_whatever_the_callers_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """The plain form's 0-d constants are created once and reused: one first created under inference
    mode, a dispatch mode or a default device must still be an ordinary CPU tensor afterwards."""
    from tests.opcount import count_ops

    monkeypatch.setattr(A, "_CONSTS", {})
    s, t = _pair(4, 5, dtype=torch.float32)
    with torch.inference_mode():
        first = KF.soft_kl(s, t, temperature=3.0)
    with torch.device("meta"):
        c = A._const(0.25, torch.float32)
    assert c.device.type == "cpu"
    assert not c.is_inference()
    assert c.item() == 0.25
    assert A._const(0.25, torch.float32) is c
    assert all(v.device.type == "cpu" and not v.is_inference() for v in A._CONSTS.values())
    leaf = s.clone().requires_grad_(True)
    out = KF.soft_kl(leaf, t, temperature=3.0)
    (grad,) = torch.autograd.grad(out, leaf)
    torch.testing.assert_close(out.detach(), first)
    assert torch.isfinite(grad).all()
    # a constant first made inside a dispatch mode is not counted there, nor is it a fake/mode tensor
    monkeypatch.setattr(A, "_CONSTS", {})
    n = count_ops(lambda: KF.soft_kl(leaf, t, temperature=5.0), [leaf])
    assert "lift_fresh" not in n.forward
    assert "scalar_tensor" not in n.forward
    assert type(A._CONSTS[(5.0, torch.float32)]) is torch.Tensor
