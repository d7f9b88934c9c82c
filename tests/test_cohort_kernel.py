"""The fused Triton cohort kernel (behind :func:`kdloss.functional.cohort_kd`) against the eager path.

Run under Triton's interpreter on CPU, or on a CUDA machine, as ``tests/triton_harness.py`` says::

    TRITON_INTERPRET=1 PYTHONPATH=. python -m pytest -q tests/test_cohort_kernel.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import kdloss.kernels as K
from kdloss.functional import cohort_kd
from kdloss.kernels._common import next_power_of_2
from kdloss.kernels.cohort import cohort_block
from tests.triton_harness import (
    DEVICE,
    HAS_TRITON,
    INTERPRET,
    assert_no_local_memory,
    eager_without_triton,
    interpreter_subprocess_test,
    needs_kernel,
    outer_run_only,
)

_FUSED_ROWS = K.fused_cohort_rows  # the real one (tests monkeypatch the module attribute)
N_CASES = 30  # tests the interpreter subprocess must pass (the kernel cases and the CPU dispatch test)


test_interpreter_subprocess = interpreter_subprocess_test(__file__, N_CASES)


@outer_run_only
def test_cohort_imports_without_triton() -> None:
    """With ``triton`` unimportable, cohort_kd imports and runs its eager path."""
    code = (
        "from kdloss.functional import cohort_kd\n"
        "x = torch.zeros(3, 5)\n"
        "print(float(cohort_kd(x, torch.stack([x, x]), torch.tensor([0, 1, 2]), alpha=1.0).total))\n"
    )
    assert eager_without_triton("_cohort_triton", code) == ["0.0"]


def test_cpu_takes_the_eager_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU tensors never reach the kernel (outside the interpreter run the dispatch says no)."""

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("fused_cohort_rows called on CPU")

    monkeypatch.setattr(K, "fused_cohort_rows", boom)
    out = cohort_kd(torch.randn(2, 5), torch.randn(3, 2, 5), torch.tensor([0, 4]))
    assert torch.isfinite(out.total)


def test_next_power_of_2_and_block() -> None:
    assert [next_power_of_2(n) for n in (1, 2, 3, 4, 5, 8, 9)] == [1, 2, 4, 4, 8, 8, 16]
    assert cohort_block(10, 1) == 16
    assert cohort_block(1000, 1) == 1024
    assert cohort_block(100000, 8) == 1024  # the (KB, BLOCK) tile stays at 8192 values


# --------------------------------------------------------------------------- kernel cases


def _check(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.shape == ref.shape
    assert out.dtype == ref.dtype
    assert torch.equal(torch.isfinite(out), torch.isfinite(ref))
    fin = torch.isfinite(ref)
    a, b = out[fin].double(), ref[fin].double()
    if dtype == torch.float32:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    else:
        assert float((a - b).norm() / b.norm().clamp(min=1e-30)) <= 1e-2


def _fused_vs_eager(
    monkeypatch: pytest.MonkeyPatch,
    s: torch.Tensor,
    t: torch.Tensor,
    labels: torch.Tensor,
    dtype: torch.dtype,
    block: int | None = None,
    **kw: object,
) -> None:
    """cohort_kd with the dispatch forced off, then on: same total, parts and student gradient."""
    results = []
    real = _FUSED_ROWS
    calls: list[int] = []

    def fused(*args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        calls.append(1)
        return real(*args, block_size=block, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(K, "fused_cohort_rows", fused)
    for on in (False, True):
        monkeypatch.setattr(K, "use_fused", lambda a, b, kernel="soft_kl", _on=on: _on)
        leaf = s.detach().clone().requires_grad_(True)
        out = cohort_kd(leaf, t, labels, **kw)  # type: ignore[arg-type]
        g = torch.rand(out.total.shape, generator=torch.Generator().manual_seed(1)).to(s.device) + 0.5
        (out.total * g).sum().backward()
        assert leaf.grad is not None
        results.append((out, leaf.grad))
    assert calls == [1]
    (ref, gref), (got, grad) = results
    assert sorted(got.parts) == sorted(ref.parts)
    _check(got.total.detach(), ref.total.detach(), dtype)
    for name in ref.parts:
        _check(got.parts[name], ref.parts[name], dtype)
    _check(grad, gref, dtype)


def _logits(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 3).to(DEVICE or "cpu", dtype)


@needs_kernel
@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("form", ["authors", "normalized"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_eager(monkeypatch: pytest.MonkeyPatch, k: int, form: str, dtype: torch.dtype) -> None:
    """K = 1..4 teachers, C = 37 over blocks of 16, per-teacher weights, -inf entries, ignored labels."""
    b, c = 5, 37
    s, t = _logits((b, c), dtype, k), _logits((k, b, c), dtype, 10 + k)
    s[1, [3, 30]] = float("-inf")  # student classes of probability 0 (not the label)
    t[0, 2, :5] = float("-inf")
    t[-1, 3, 20:] = float("-inf")
    labels = torch.tensor([0, 7, 36, 3, 12], device=s.device)
    weights = [0.5, 2.0, 0.0, 1.0][:k] if k > 1 else [3.0]
    kw = {"temperature": 2.5, "alpha": 0.3, "form": form, "weights": weights}
    _fused_vs_eager(monkeypatch, s, t, labels, dtype, block=16, reduction="none", **kw)
    # ignore_index labels: cohort_kd refuses them on CPU (range check) but not on CUDA, where the
    # eager cross-entropy gives those rows CE 0; compare the row functions behind the dispatch.
    labels[3] = -100
    _rows_vs_eager(s, t, labels, dtype, weights, temperature=2.5, kd_coef=0.3, ce_coef=0.7 * sum(weights))


def _rows_vs_eager(
    s: torch.Tensor,
    t: torch.Tensor,
    labels: torch.Tensor,
    dtype: torch.dtype,
    weights: list[float],
    *,
    temperature: float,
    kd_coef: float,
    ce_coef: float,
    block: int | None = 16,
) -> None:
    from kdloss.functional.cohort import _cohort_rows_eager

    w = torch.tensor(weights, device=s.device)
    outs = []
    for fused in (False, True):
        leaf = s.detach().clone().requires_grad_(True)
        if fused:
            rows = _FUSED_ROWS(
                leaf, t, labels, temperature=temperature, kl_weights=w * kd_coef, ce_weight=ce_coef, block_size=block
            )
        else:
            rows = _cohort_rows_eager(leaf, t, labels, temperature, weights, kd_coef, ce_coef)
        g = torch.linspace(0.5, 1.5, s.shape[0], device=s.device)
        (rows[0] * g).sum().backward()
        outs.append((*(r.detach() for r in rows), leaf.grad))
    for got, ref in zip(outs[1], outs[0]):
        assert got is not None
        assert ref is not None
        _check(got, ref, dtype)
    ignored = labels == -100
    assert torch.equal(outs[1][2][ignored], torch.zeros_like(outs[1][2][ignored]))  # ignored rows: CE 0


@needs_kernel
@pytest.mark.parametrize("reduction", ["batchmean", "sum"])
@pytest.mark.parametrize("case", ["unit_weights", "alpha1", "alpha0", "one_block"])
def test_reductions_and_alphas(monkeypatch: pytest.MonkeyPatch, reduction: str, case: str) -> None:
    s, t = _logits((4, 23), torch.float32, 3), _logits((3, 4, 23), torch.float32, 4)
    labels = torch.tensor([1, 5, 22, 0], device=s.device)
    alpha = {"alpha1": 1.0, "alpha0": 0.0}.get(case, 0.1)
    block = None if case == "one_block" else 16
    _fused_vs_eager(
        monkeypatch, s, t, labels, torch.float32, block=block, temperature=5.0, alpha=alpha, reduction=reduction
    )


@needs_kernel
def test_mixed_dtypes_mapping_and_non_contiguous(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bf16 student, float32 teachers given as a mapping (stacked inside), a transposed student view."""
    s = _logits((37, 6), torch.bfloat16, 5).t()
    assert s.stride(-1) != 1
    teachers = {"head1": _logits((6, 37), torch.float32, 6), "final": _logits((6, 37), torch.float32, 7)}
    labels = torch.tensor([0, 1, 2, 3, 4, 5], device=s.device)
    _fused_vs_eager(monkeypatch, s, teachers, labels, torch.bfloat16, block=32, temperature=1.0, alpha=0.5)  # type: ignore[arg-type]


@needs_kernel
def test_no_grad_and_single_backward() -> None:
    s, t = _logits((3, 20), torch.float32, 8), _logits((2, 3, 20), torch.float32, 9)
    labels = torch.tensor([0, 1, 2], device=s.device)
    w = torch.ones(2, device=s.device)
    with torch.no_grad():
        total, kd, ce = K.fused_cohort_rows(s, t, labels, temperature=2.0, kl_weights=w, ce_weight=1.0)
    assert kd.shape == (2, 3)
    assert ce.shape == (3,)
    torch.testing.assert_close(total, (kd * w[:, None]).sum(0) + ce)
    leaf = s.clone().requires_grad_(True)
    out = K.fused_cohort_rows(leaf, t, labels, temperature=2.0, kl_weights=w, ce_weight=1.0)[0].sum()
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="can run only once"):
        out.backward()


@needs_kernel
def test_kernel_is_interpreted_on_cpu() -> None:
    from kdloss.kernels._cohort_triton import cohort_rows_kernel

    expected = "InterpretedFunction" if DEVICE == "cpu" else "JITFunction"
    assert type(cohort_rows_kernel).__name__ == expected


# --------------------------------------------------------------------------- GPU only: the benchmark sizes


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA (the benchmark sizes)")
@pytest.mark.parametrize(
    ("k", "b", "c", "dtype"),
    [(5, 1024, 1000, torch.float32), (4, 4096, 100, torch.bfloat16), (4, 512, 32000, torch.bfloat16)],
    ids=str,
)
def test_benchmark_sizes_on_gpu(monkeypatch: pytest.MonkeyPatch, k: int, b: int, c: int, dtype: torch.dtype) -> None:
    s, t = _logits((b, c), dtype, 0), _logits((k, b, c), dtype, 1)
    labels = torch.randint(0, c, (b,), device=s.device)
    labels[0] = -100
    _fused_vs_eager(monkeypatch, s, t, labels, dtype, temperature=5.0, alpha=0.1, weights=[1.0] * (k - 1) + [2.0])


def _aot_compile(sdt: str, tdt: str, k: int, c: int, write_grad: bool):  # type: ignore[no-untyped-def]
    """Compile the kernel for an H100 (sm_90) without a GPU, as a contiguous-input launch would."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kdloss.kernels._cohort_triton import cohort_rows_kernel as kernel

    kb = next_power_of_2(k)
    block = cohort_block(c, kb)
    names = list(kernel.arg_names)
    types = {"S": f"*{sdt}", "TT": f"*{tdt}", "W": "*fp32", "LABELS": "*i64", "TOTAL": "*fp32", "KD": "*fp32"}
    types.update(CE="*fp32", GRAD=f"*{sdt}", C="i32", K="i32", ignore_index="i32")
    types.update({n: "i32" for n in ("stride_sr", "stride_tk", "stride_tr", "stride_gr", "stride_kdk")})
    types.update({n: "fp32" for n in ("temperature", "ce_weight")})
    consts: dict[str, object] = {"WRITE_GRAD": write_grad, "KB": kb, "BLOCK": block}
    sig = {n: "constexpr" if n in consts else types[n] for n in names}
    aligned = ("S", "TT", "W", "LABELS", "TOTAL", "KD", "CE", "GRAD", "stride_sr", "stride_tr", "stride_gr", "C")
    src = ASTSource(
        fn=kernel,
        signature=sig,
        constexprs={(names.index(n),): v for n, v in consts.items()},
        attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned},
    )
    options = {"num_warps": 4 if block * kb <= 2048 else 8, "enable_fp_fusion": True}
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


@pytest.mark.skipif(INTERPRET, reason="the interpreter replaces the compiler")
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize(
    ("sdt", "tdt", "k", "c", "write_grad"),
    [("fp32", "fp32", 5, 1000, True), ("bf16", "bf16", 4, 100, True), ("fp16", "fp32", 2, 32000, False)],
    ids=["k5-c1000-fp32", "k4-c100-bf16", "k2-c32000-mixed-nograd"],
)
def test_compiles_for_h100_without_gpu(sdt: str, tdt: str, k: int, c: int, write_grad: bool, tmp_path: Path) -> None:
    """Triton's real front end and ptxas (not the interpreter) accept the kernel; no local memory, no spills."""
    try:
        compiled = _aot_compile(sdt, tdt, k, c, write_grad)
    except ImportError as exc:  # a Triton without these entry points
        pytest.skip(f"ahead-of-time compilation API not available: {exc}")
    assert_no_local_memory(compiled, tmp_path)


@needs_kernel
def test_random_rows_match_eager() -> None:
    """Property check of the row function: random K, C, block, T, coefficients, -inf patterns, ignored labels."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    @settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(
        k=st.integers(1, 5),
        rows=st.integers(1, 4),
        c=st.integers(1, 70),
        temperature=st.floats(0.5, 5.0),
        alpha=st.sampled_from([1.0, 0.6, 0.0]),
        seed=st.integers(0, 2**16),
        p_inf=st.sampled_from([0.0, 0.3]),
        dtype=st.sampled_from([torch.float32, torch.float16]),
    )
    def check(
        k: int, rows: int, c: int, temperature: float, alpha: float, seed: int, p_inf: float, dtype: torch.dtype
    ) -> None:
        g = torch.Generator().manual_seed(seed)
        s = torch.randn(rows, c, generator=g) * 4
        t = torch.randn(k, rows, c, generator=g) * 4
        s[torch.rand(rows, c, generator=g) < p_inf] = float("-inf")
        t[torch.rand(k, rows, c, generator=g) < p_inf] = float("-inf")
        s[:, 0] = 1.0  # no fully -inf row (the eager path gives NaN there)
        t[:, :, 0] = 0.5
        labels = torch.randint(0, c, (rows,), generator=g)
        labels[torch.rand(rows, generator=g) < 0.3] = -100
        weights = (torch.rand(k, generator=g) + 0.1).tolist()
        dev = DEVICE or "cpu"
        s, t, labels = s.to(dev, dtype), t.to(dev, dtype), labels.to(dev)
        tol_dtype = torch.float32 if dtype == torch.float32 else torch.bfloat16
        _rows_vs_eager(s, t, labels, tol_dtype, weights, temperature=temperature, kd_coef=alpha, ce_coef=1 - alpha)

    check()
