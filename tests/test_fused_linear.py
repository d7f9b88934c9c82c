"""fused_linear_kd / FusedLinearKDLoss: values and gradients against the materialised-logits reference.

The reference (``tests/naive/fused_linear.py``) computes both logit tensors and lets autograd differentiate,
in float64; the fused loss must agree for every divergence, temperature, reduction, chunk size
(dividing the token count or not), with and without biases, ignored tokens and a hard term.
"""

from __future__ import annotations

import itertools
import pickle

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

from kdloss import FusedLinearKDLoss, ShapeError
from kdloss.functional import fused_linear_kd, soft_kl
from kdloss.functional.fused_linear import default_chunk_size
from tests.helpers import Tol, assert_close, assert_compiled_matches_eager, dtype_case_for, requires_cuda
from tests.naive.fused_linear import lm_kd
from tests.strategies import PROPERTY_SETTINGS

DIVERGENCES = ("forward", "reverse", "jsd", "tv")
F64 = Tol(1e-10, 1e-9)


def _inputs(
    n: int = 13,
    v: int = 11,
    hs: int = 5,
    ht: int = 7,
    *,
    seed: int = 0,
    bias: bool = False,
    dtype: torch.dtype = torch.float64,
    device: str = "cpu",
    scale: float = 1.0,
) -> dict[str, Tensor | None]:
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, s: float = 1.0) -> Tensor:
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(dtype=dtype, device=device)

    return {
        "hs": r(n, hs, s=scale).requires_grad_(True),
        "ws": r(v, hs).requires_grad_(True),
        "ht": r(n, ht, s=scale),
        "wt": r(v, ht),
        "bs": r(v).requires_grad_(True) if bias else None,
        "bt": r(v) if bias else None,
    }


def _labels(n: int, v: int, *, seed: int = 0, ignore_every: int = 3, device: str = "cpu") -> Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    y = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        y[::ignore_every] = -100
    return y.to(device)


def _both(x: dict[str, Tensor | None], labels: Tensor | None, go: Tensor | None = None, **kw: object) -> None:
    """Fused and reference agree in value and in the gradients of hidden states, weight and bias."""
    chunk = kw.pop("chunk_size", None)
    out = fused_linear_kd(
        x["hs"], x["ws"], x["ht"], x["wt"], labels, student_bias=x["bs"], teacher_bias=x["bt"], chunk_size=chunk, **kw
    )
    jsd_weight = kw.pop("jsd_weight", None)
    ref = lm_kd(x["hs"], x["ws"], x["ht"], x["wt"], labels, bs=x["bs"], bt=x["bt"], beta=jsd_weight or 0.5, **kw)  # type: ignore[arg-type]
    assert out.shape == ref.shape
    assert out.dtype == ref.dtype
    assert_close(out, ref, F64, msg=f"value {kw} chunk={chunk}")
    grad_out = torch.randn(out.shape, dtype=out.dtype) if go is None else go
    inputs = [t for t in (x["hs"], x["ws"], x["bs"]) if t is not None]
    got = torch.autograd.grad(out, inputs, grad_out)
    want = torch.autograd.grad(ref, inputs, grad_out)
    for name, a, b in zip(("hidden", "weight", "bias"), got, want):
        assert_close(a, b, F64, msg=f"gradient of the {name} {kw} chunk={chunk}")


# ------------------------------------------------------------------------------------ the reference


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_matches_the_materialised_reference_in_float64(divergence: str, reduction: str) -> None:
    """Every temperature / chunk size (1, 4: not dividing 13, 13, 32 > N) / bias / labels / hard-term case."""
    n, v = 13, 11
    for temperature, chunk, bias, labelled, hard in itertools.product(
        (1.0, 2.5), (1, 4, 13, 32), (False, True), (False, True), (0.0, 0.7)
    ):
        if hard and not labelled:
            continue
        x = _inputs(n, v, seed=chunk, bias=bias)
        labels = _labels(n, v, seed=chunk) if labelled else None
        beta = 0.3 if divergence == "jsd" else None
        _both(
            x,
            labels,
            temperature=temperature,
            divergence=divergence,
            jsd_weight=beta,
            hard_weight=hard,
            soft_weight=0.9,
            reduction=reduction,
            chunk_size=chunk,
        )


@PROPERTY_SETTINGS
@given(
    n=st.integers(1, 24),
    v=st.integers(2, 40),
    h=st.integers(1, 9),
    chunk=st.integers(1, 30),
    divergence=st.sampled_from(DIVERGENCES),
    temperature=st.sampled_from([0.5, 1.0, 3.0]),
    beta=st.floats(0.05, 0.95),
    hard=st.sampled_from([0.0, 0.5]),
    ignore_every=st.sampled_from([0, 1, 2, 5]),
    bias=st.booleans(),
    scale=st.sampled_from([0.0, 1.0, 8.0]),
    seed=st.integers(0, 2**16),
)
def test_property_matches_reference(
    n: int,
    v: int,
    h: int,
    chunk: int,
    divergence: str,
    temperature: float,
    beta: float,
    hard: float,
    ignore_every: int,
    bias: bool,
    scale: float,
    seed: int,
) -> None:
    x = _inputs(n, v, h, h + 2, seed=seed, bias=bias, scale=scale)
    labels = _labels(n, v, seed=seed, ignore_every=ignore_every)
    _both(
        x,
        labels,
        temperature=temperature,
        divergence=divergence,
        jsd_weight=beta if divergence == "jsd" else None,
        hard_weight=hard,
        chunk_size=chunk,
    )


def test_forward_divergence_is_soft_kl_of_the_logits() -> None:
    """The default is kdloss's KD convention: soft_kl(h_s W_s^T, h_t W_t^T) per token, T^2 included."""
    x = _inputs(2 * 6, 9, seed=4)
    hs, ws, ht, wt = (x[k] for k in ("hs", "ws", "ht", "wt"))
    assert hs is not None
    assert ws is not None
    assert ht is not None
    assert wt is not None
    out = fused_linear_kd(hs.view(2, 6, 5), ws, ht.view(2, 6, 7), wt, temperature=4.0, chunk_size=5)
    ref = soft_kl((hs @ ws.T).view(2, 6, 9), (ht @ wt.T).view(2, 6, 9), temperature=4.0)
    assert_close(out, ref, F64)


def test_leading_dims_and_reduction_none_shape() -> None:
    x = _inputs(12, 9, seed=1)
    assert x["hs"] is not None
    assert x["ht"] is not None
    hs, ht = x["hs"].view(3, 4, 5), x["ht"].view(3, 4, 7)
    labels = _labels(12, 9).view(3, 4)
    rows = fused_linear_kd(hs, x["ws"], ht, x["wt"], labels, reduction="none", chunk_size=5)  # type: ignore[arg-type]
    assert rows.shape == (3, 4)
    assert (rows[labels == -100] == 0).all()
    mean = fused_linear_kd(hs, x["ws"], ht, x["wt"], labels, chunk_size=5)  # type: ignore[arg-type]
    assert_close(mean, rows.sum() / (labels != -100).sum(), F64)


# ------------------------------------------------------------------------------------ what is masked


def test_ignored_tokens_may_hold_nan_and_get_zero_gradients() -> None:
    x = _inputs(10, 7, seed=2)
    assert x["hs"] is not None
    assert x["ht"] is not None
    hs = x["hs"].detach().clone()
    ht = x["ht"].clone()
    labels = _labels(10, 7, ignore_every=0)
    labels[[1, 6]] = -100
    hs[1] = float("nan")
    ht[6] = float("inf")
    hs.requires_grad_(True)
    for reduction in ("batchmean", "none"):
        out = fused_linear_kd(hs, x["ws"], ht, x["wt"], labels, hard_weight=0.5, reduction=reduction, chunk_size=3)  # type: ignore[arg-type]
        gh, gw = torch.autograd.grad(out.sum(), [hs, x["ws"]])
        assert torch.isfinite(out).all()
        assert torch.isfinite(gh).all()
        assert torch.isfinite(gw).all()
        assert (gh[[1, 6]] == 0).all()
    keep = labels != -100
    clean = fused_linear_kd(hs[keep], x["ws"], ht[keep], x["wt"], labels[keep], hard_weight=0.5)  # type: ignore[arg-type]
    assert_close(fused_linear_kd(hs, x["ws"], ht, x["wt"], labels, hard_weight=0.5), clean, F64)  # type: ignore[arg-type]


def test_all_tokens_ignored_gives_zero_and_zero_gradients() -> None:
    x = _inputs(6, 5, seed=3, bias=True)
    labels = torch.full((6,), -100)
    out = fused_linear_kd(x["hs"], x["ws"], x["ht"], x["wt"], labels, student_bias=x["bs"], hard_weight=1.0)  # type: ignore[arg-type]
    assert out.item() == 0.0
    grads = torch.autograd.grad(out, [x["hs"], x["ws"], x["bs"]])  # type: ignore[list-item]
    assert all(torch.count_nonzero(g) == 0 for g in grads)


def test_no_tokens() -> None:
    x = _inputs(0, 5, seed=3)
    out = fused_linear_kd(x["hs"], x["ws"], x["ht"], x["wt"])  # type: ignore[arg-type]
    assert out.item() == 0.0
    gh, gw = torch.autograd.grad(out, [x["hs"], x["ws"]])  # type: ignore[list-item]
    assert gh.shape == (0, 5)
    assert torch.count_nonzero(gw) == 0


# ------------------------------------------------------------------------------------ what gets gradients


def test_the_teacher_gets_no_gradient() -> None:
    x = _inputs(8, 6, seed=5, bias=True)
    assert x["ht"] is not None
    assert x["wt"] is not None
    assert x["bt"] is not None
    teacher = [x["ht"].requires_grad_(True), x["wt"].requires_grad_(True), x["bt"].requires_grad_(True)]
    out = fused_linear_kd(
        x["hs"], x["ws"], x["ht"], x["wt"], student_bias=x["bs"], teacher_bias=x["bt"], divergence="jsd"
    )  # type: ignore[arg-type]
    assert all(g is None for g in torch.autograd.grad(out, teacher, allow_unused=True))


def test_only_what_requires_grad_is_differentiated() -> None:
    x = _inputs(8, 6, seed=6)
    assert x["ws"] is not None
    assert x["hs"] is not None
    frozen = x["ws"].detach()  # a frozen output layer (adapters / LoRA below it)
    out = fused_linear_kd(x["hs"], frozen, x["ht"], x["wt"])  # type: ignore[arg-type]
    (gh,) = torch.autograd.grad(out, [x["hs"]])
    ref = lm_kd(x["hs"], frozen, x["ht"], x["wt"])  # type: ignore[arg-type]
    assert_close(gh, torch.autograd.grad(ref, [x["hs"]])[0], F64)
    with torch.no_grad():
        assert not fused_linear_kd(x["hs"], x["ws"], x["ht"], x["wt"]).requires_grad  # type: ignore[arg-type]


def test_double_backward_is_refused() -> None:
    x = _inputs(5, 4, seed=7)
    out = fused_linear_kd(x["hs"], x["ws"], x["ht"], x["wt"])  # type: ignore[arg-type]
    (gh,) = torch.autograd.grad(out, [x["hs"]], create_graph=True)  # type: ignore[list-item]
    with pytest.raises(RuntimeError, match=r"does not require grad|once_differentiable"):
        torch.autograd.grad(gh.sum(), [x["hs"]])  # type: ignore[list-item]


def test_backward_twice_with_retain_graph_gives_the_same_gradients() -> None:
    x = _inputs(9, 6, seed=8)
    out = fused_linear_kd(x["hs"], x["ws"], x["ht"], x["wt"])  # type: ignore[arg-type]
    first = torch.autograd.grad(out * 3.0, [x["hs"], x["ws"]], retain_graph=True)  # type: ignore[list-item]
    second = torch.autograd.grad(out * 3.0, [x["hs"], x["ws"]])  # type: ignore[list-item]
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------ precision


def test_bfloat16_inputs_compute_in_float32() -> None:
    """bf16 hidden states and weights: the logits come from a bf16 matmul, everything after in float32."""
    case = dtype_case_for(torch.bfloat16)
    x = _inputs(64, 50, 16, 24, seed=9, dtype=torch.bfloat16)
    labels = _labels(64, 50)
    out = fused_linear_kd(x["hs"], x["ws"], x["ht"], x["wt"], labels, hard_weight=0.3, divergence="jsd", chunk_size=7)  # type: ignore[arg-type]
    assert out.dtype == torch.float32
    # reference: the same bf16-rounded logits, then float64
    hs, ws, ht, wt = (x[k].detach().double() for k in ("hs", "ws", "ht", "wt"))  # type: ignore[union-attr]
    ref = lm_kd(hs, ws, ht, wt, labels, hard_weight=0.3, divergence="jsd")
    assert_close(out, ref, Tol(2e-3, 2e-3))
    gh, gw = torch.autograd.grad(out, [x["hs"], x["ws"]])  # type: ignore[list-item]
    assert gh.dtype == gw.dtype == torch.bfloat16
    hs.requires_grad_(True)
    ws.requires_grad_(True)
    rh, rw = torch.autograd.grad(lm_kd(hs, ws, ht, wt, labels, hard_weight=0.3, divergence="jsd"), [hs, ws])
    # the gradients come back in bf16 (8 mantissa bits): within 1 % of the largest, element by element
    assert_close(gh, rh, Tol(1e-2 * float(rh.abs().max()), case.grad.rtol))
    assert_close(gw, rw, Tol(1e-2 * float(rw.abs().max()), case.grad.rtol))


def test_weight_gradient_accumulates_in_float32_across_chunks() -> None:
    """One token per chunk (512 chunks): the bf16 weight's gradient is as accurate as with one chunk.
    Summed in bf16 its error would grow with the number of chunks."""
    x = _inputs(512, 16, 8, 8, seed=10, dtype=torch.bfloat16)
    hs, ws, ht, wt = (x[k] for k in ("hs", "ws", "ht", "wt"))
    r = [t.detach().double().requires_grad_(True) for t in (hs, ws)]  # type: ignore[union-attr]
    (ref,) = torch.autograd.grad(lm_kd(r[0], r[1], ht.double(), wt.double(), reduction="sum"), [r[1]])  # type: ignore[union-attr]
    errors = {}
    for chunk in (512, 1):
        out = fused_linear_kd(hs, ws, ht, wt, reduction="sum", chunk_size=chunk)  # type: ignore[arg-type]
        (gw,) = torch.autograd.grad(out, [ws])  # type: ignore[list-item]
        errors[chunk] = float((gw.double() - ref).abs().max() / ref.abs().max())
    assert errors[1] <= 2 * errors[512] + 2e-3, errors


def test_inside_autocast_the_matmuls_run_in_the_autocast_dtype(device: str) -> None:
    """Under torch.autocast (an AMP step with float32 master weights): the same numbers as bf16 inputs,
    float32 loss, float32 gradients for float32 weights."""
    x = _inputs(20, 30, 8, 8, seed=11, dtype=torch.float32, device=device)
    hs, ws, ht, wt = (x[k] for k in ("hs", "ws", "ht", "wt"))
    with torch.autocast(device, dtype=torch.bfloat16):
        out = fused_linear_kd(hs, ws, ht, wt, temperature=2.0, chunk_size=6)  # type: ignore[arg-type]
        rows = fused_linear_kd(hs, ws, ht, wt, temperature=2.0, chunk_size=6, reduction="none")  # type: ignore[arg-type]
    assert out.dtype == torch.float32
    gh, gw = torch.autograd.grad(out, [hs, ws])  # type: ignore[list-item]
    assert gh.dtype == gw.dtype == torch.float32
    b = [t.detach().bfloat16() for t in (hs, ws, ht, wt)]  # type: ignore[union-attr]
    b[0].requires_grad_(True)
    b[1].requires_grad_(True)
    want = fused_linear_kd(*b, temperature=2.0, chunk_size=6)
    assert_close(out, want, Tol(1e-6, 1e-6))
    assert_close(rows.mean(), want, Tol(1e-6, 1e-6))
    wh, ww = torch.autograd.grad(want, b[:2])
    assert_close(gh, wh, Tol(1e-6, 1e-2))
    assert_close(gw, ww, Tol(1e-6, 1e-2))
    # the backward of reduction="none" (recomputed outside the autocast region) uses the same dtypes
    (rh,) = torch.autograd.grad(rows.mean(), [hs])  # type: ignore[list-item]
    assert_close(rh, gh, Tol(1e-6, 1e-2))


# ------------------------------------------------------------------------------------ memory


def test_peak_memory_is_a_few_chunks_not_the_logits() -> None:
    """Forward+backward at 512 tokens x V = 4096: the fused loss's allocator peak (torch.profiler) is
    below 1/4 of the materialised formulation's and within the gradients plus a few chunks."""
    from benchmarks.bench_fused_linear import cpu_peak_bytes
    from tests.naive.fused_linear import lm_kl_div

    n, v, h, chunk = 512, 4096, 32, 32
    x = _inputs(n, v, h, h, seed=12, dtype=torch.float32)
    hs, ws, ht, wt = (x[k] for k in ("hs", "ws", "ht", "wt"))

    def fused() -> object:
        out = fused_linear_kd(hs, ws, ht, wt, chunk_size=chunk)  # type: ignore[arg-type]
        return torch.autograd.grad(out, [hs, ws])  # type: ignore[list-item]

    def naive() -> object:
        return torch.autograd.grad(lm_kl_div(hs, ws, ht, wt, 1.0), [hs, ws])  # type: ignore[arg-type, list-item]

    fused_peak, naive_peak = cpu_peak_bytes(fused), cpu_peak_bytes(naive)
    grads = (n * h + v * h) * 4
    assert naive_peak >= 4 * n * v * 4  # the probe sees the materialised logits
    assert fused_peak <= grads + 8 * chunk * v * 4, (fused_peak, grads)
    assert fused_peak * 4 <= naive_peak, (fused_peak, naive_peak)


def test_default_chunk_size() -> None:
    assert default_chunk_size(32000, "cpu") == 256
    assert default_chunk_size(128256, "cuda") == 512
    assert default_chunk_size(256, "cpu") == 8192
    assert default_chunk_size(10**9, "cpu") == 16
    x = _inputs(40, 7, seed=13)
    _both(x, None, chunk_size=None)


# ------------------------------------------------------------------------------------ compile, meta, module


def test_compile_fullgraph_matches_eager() -> None:
    """One graph (aot_eager: dynamo + AOTAutograd, no code generation) with a hard term and ignored tokens,
    at two token counts and two temperatures."""
    x = _inputs(20, 17, 6, 9, seed=14, dtype=torch.float32)
    wt, ht = x["wt"], x["ht"]
    ws = x["ws"]

    def fn(hs: Tensor, labels: Tensor, temperature: float) -> Tensor:
        return fused_linear_kd(
            hs,
            ws,
            ht[: hs.shape[0]],
            wt,
            labels,
            temperature=temperature,
            divergence="jsd",
            hard_weight=0.5,
            chunk_size=8,
        )  # type: ignore[index, arg-type]

    calls = [(x["hs"], _labels(20, 17), 2.0), (x["hs"][:13], _labels(13, 17, seed=3), 3.0)]  # type: ignore[index]
    assert_compiled_matches_eager(fn, calls, Tol(1e-5, 1e-5), backend="aot_eager")


@pytest.mark.slow
def test_compile_inductor_matches_eager() -> None:
    """Inductor generates the chunk loop's code (C++ on the CPU, Triton on a GPU): same values and gradients."""
    x = _inputs(24, 33, 8, 8, seed=15, dtype=torch.float32)
    ws, ht, wt = x["ws"], x["ht"], x["wt"]

    def fn(hs: Tensor, labels: Tensor) -> Tensor:
        return fused_linear_kd(hs, ws, ht, wt, labels, temperature=2.0, hard_weight=0.5, chunk_size=10)  # type: ignore[arg-type]

    assert_compiled_matches_eager(fn, [(x["hs"], _labels(24, 33))], Tol(1e-5, 1e-5), dynamic=False)


def test_runs_on_meta_tensors_without_reading_values() -> None:
    """No host synchronisation: the whole loss, forward and backward, runs on tensors without data."""
    hs = torch.zeros(10, 4, device="meta", requires_grad=True)
    ws = torch.zeros(6, 4, device="meta", requires_grad=True)
    labels = torch.zeros(10, dtype=torch.long, device="meta")
    for reduction in ("batchmean", "none"):
        out = fused_linear_kd(
            hs, ws, torch.zeros(10, 3, device="meta"), torch.zeros(6, 3, device="meta"), labels,
            hard_weight=0.5, divergence="tv", reduction=reduction, chunk_size=3,
        )  # fmt: skip
        assert out.device.type == "meta"
        gh, gw = torch.autograd.grad(out.sum(), [hs, ws])
        assert gh.shape == (10, 4)
        assert gw.shape == (6, 4)


def test_module_matches_function_and_round_trips() -> None:
    x = _inputs(9, 8, seed=16, bias=True)
    labels = _labels(9, 8)
    mod = FusedLinearKDLoss(temperature=2.0, divergence="jsd", jsd_weight=0.2, hard_weight=0.4, chunk_size=4)
    assert repr(mod) == (
        "FusedLinearKDLoss(temperature=2.0, divergence='jsd', jsd_weight=0.2, hard_weight=0.4, soft_weight=1.0, "
        "reduction='batchmean', chunk_size=4)"
    )
    got = mod(x["hs"], x["ws"], x["ht"], x["wt"], labels, student_bias=x["bs"], teacher_bias=x["bt"])  # type: ignore[arg-type]
    want = fused_linear_kd(
        x["hs"], x["ws"], x["ht"], x["wt"], labels, student_bias=x["bs"], teacher_bias=x["bt"],
        temperature=2.0, divergence="jsd", jsd_weight=0.2, hard_weight=0.4, chunk_size=4,
    )  # type: ignore[arg-type]  # fmt: skip
    assert torch.equal(got, want)
    copy = pickle.loads(pickle.dumps(mod))
    assert repr(copy) == repr(mod)
    assert mod.state_dict() == {}


# ------------------------------------------------------------------------------------ errors


def test_bad_configurations_fail_when_the_module_is_built() -> None:
    with pytest.raises(ValueError, match=r"temperature must be a finite number > 0, got 0.0"):
        FusedLinearKDLoss(temperature=0.0)
    with pytest.raises(ValueError, match="divergence must be one of 'forward', 'reverse', 'jsd', 'tv', got 'kl'"):
        FusedLinearKDLoss(divergence="kl")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="jsd_weight is the JSD mixture weight and needs divergence='jsd'"):
        FusedLinearKDLoss(jsd_weight=0.5)
    with pytest.raises(ValueError, match=r"jsd_weight must lie in \(0, 1\), got 1.0"):
        FusedLinearKDLoss(divergence="jsd", jsd_weight=1.0)
    with pytest.raises(ValueError, match="reduction must be one of 'none', 'sum', 'batchmean', got 'mean'"):
        FusedLinearKDLoss(reduction="mean")
    with pytest.raises(ValueError, match="hard_weight and soft_weight are both 0"):
        FusedLinearKDLoss(soft_weight=0.0)
    with pytest.raises(ValueError, match=r"hard_weight must be a finite number >= 0, got -1.0"):
        FusedLinearKDLoss(hard_weight=-1.0)
    with pytest.raises(ValueError, match="chunk_size must be a positive int or None, got 0"):
        FusedLinearKDLoss(chunk_size=0)


def test_bad_inputs_are_named() -> None:
    hs, ws, ht, wt = torch.randn(4, 3), torch.randn(6, 3), torch.randn(4, 5), torch.randn(6, 5)
    with pytest.raises(TypeError, match="student_hidden must be a floating-point tensor"):
        fused_linear_kd(hs.long(), ws, ht, wt)
    with pytest.raises(ShapeError, match=r"student_hidden must have at least 2 dimensions.*got shape \(3,\)"):
        fused_linear_kd(hs[0], ws, ht, wt)
    with pytest.raises(ShapeError, match=r"same leading \(token\) dimensions, got \(4, 3\) and \(3, 5\)"):
        fused_linear_kd(hs, ws, ht[:3], wt)
    with pytest.raises(
        ShapeError,
        match=r"student_weight must have shape \(V, H\) with H = student_hidden's last dimension 3, got \(6, 4\)",
    ):
        fused_linear_kd(hs, torch.randn(6, 4), ht, wt)
    with pytest.raises(ShapeError, match=r"same vocabulary size.*got \(6, 3\) and \(7, 5\)"):
        fused_linear_kd(hs, ws, ht, torch.randn(7, 5))
    with pytest.raises(ShapeError, match=r"student_bias must have shape \(V,\) = \(6,\), got \(5,\)"):
        fused_linear_kd(hs, ws, ht, wt, student_bias=torch.zeros(5))
    with pytest.raises(
        TypeError,
        match=r"student_hidden and student_weight must have the same dtype outside autocast, "
        r"got torch.bfloat16 and torch.float32",
    ):
        fused_linear_kd(hs.bfloat16(), ws, ht, wt)
    with pytest.raises(ValueError, match=r"hard_weight=0.5 > 0 needs labels"):
        fused_linear_kd(hs, ws, ht, wt, hard_weight=0.5)
    with pytest.raises(
        ShapeError,
        match=r"labels must have the hidden states' shape without the feature dimension, \(4,\), got \(2, 2\)",
    ):
        fused_linear_kd(hs, ws, ht, wt, torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(TypeError, match=r"labels must be an integer tensor, got dtype torch.float32"):
        fused_linear_kd(hs, ws, ht, wt, torch.zeros(4))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 6\) or equal ignore_index=-100, got 6"):
        fused_linear_kd(hs, ws, ht, wt, torch.tensor([0, 1, 6, -100]), hard_weight=1.0)
    with pytest.raises(ValueError, match="chunk_size must be a positive int or None, got -2"):
        fused_linear_kd(hs, ws, ht, wt, chunk_size=-2)
    with pytest.raises(
        ValueError, match="student_hidden and teacher_weight must be on the same device, got cpu and meta"
    ):
        fused_linear_kd(hs, ws, ht, wt.to("meta"))


# ------------------------------------------------------------------------------------ CUDA


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_cuda_bfloat16_matches_float64_reference(divergence: str) -> None:
    """On the GPU in bf16 (float32 accumulation of the weight's gradient inside the matmul when torch >= 2.8)."""
    x = _inputs(300, 1000, 64, 96, seed=17, dtype=torch.bfloat16, device="cuda")
    labels = _labels(300, 1000, device="cuda")
    out = fused_linear_kd(
        x["hs"], x["ws"], x["ht"], x["wt"], labels, divergence=divergence, hard_weight=0.5, chunk_size=64
    )  # type: ignore[arg-type]
    gh, gw = torch.autograd.grad(out, [x["hs"], x["ws"]])  # type: ignore[list-item]
    r = [x[k].detach().double().cpu() for k in ("hs", "ws", "ht", "wt")]  # type: ignore[union-attr]
    r[0].requires_grad_(True)
    r[1].requires_grad_(True)
    ref = lm_kd(*r, labels.cpu(), divergence=divergence, hard_weight=0.5)
    rh, rw = torch.autograd.grad(ref, r[:2])
    assert_close(out, ref, Tol(2e-3, 2e-3))
    assert_close(gh, rh, Tol(1e-2 * float(rh.abs().max()), 3e-2))
    assert_close(gw, rw, Tol(1e-2 * float(rw.abs().max()), 3e-2))
