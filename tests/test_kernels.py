"""The fused Triton soft-KL(+CE) kernel against the eager path: values and gradients.

Run under Triton's interpreter on CPU, or on a CUDA machine, as ``tests/triton_harness.py`` says::

    TRITON_INTERPRET=1 PYTHONPATH=. python -m pytest -q tests/test_kernels.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import kdloss.kernels as K
import kdloss.kernels.soft_kl as KS
from kdloss.functional import kd_ce_loss, soft_kl
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

test_interpreter_subprocess = interpreter_subprocess_test(__file__, 40)


@outer_run_only
def test_kdloss_imports_without_triton() -> None:
    """With ``triton`` unimportable, kdloss imports, reports no kernels and runs the eager path."""
    code = (
        "from kdloss.functional import soft_kl, kd_ce_loss\n"
        "x = torch.randn(3, 5)\n"
        "print(float(soft_kl(x, x)), float(kd_ce_loss(x, x, torch.tensor([0, 1, 2]), alpha=1.0)))\n"
    )
    assert eager_without_triton("_kd_triton", code) == ["0.0", "0.0"]


def test_dispatch_switches(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.zeros(2, 3)
    assert not K.use_fused(x, x)  # CPU tensors never take the kernel
    monkeypatch.setenv("KDLOSS_KERNELS", "off")
    assert not K.kernels_enabled()
    monkeypatch.setenv("KDLOSS_KERNELS", "verify")
    assert K.kernels_enabled()
    K.set_kernels_enabled(False)
    try:
        assert not K.kernels_enabled()
    finally:
        K.set_kernels_enabled(True)
    assert K.kernels_enabled()


@pytest.mark.skipif(not torch.cuda.is_available() or not HAS_TRITON, reason="needs CUDA and triton")
def test_dispatch_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(4, 10, device="cuda")
    assert K.use_fused(x, x.bfloat16())
    assert not K.use_fused(x.double(), x.double())
    monkeypatch.setenv("KDLOSS_KERNELS", "off")
    assert not K.use_fused(x, x)


_FLAGS_OFF = {"HAS_MASK": False, "HAS_LABELS": False, "HAS_CE": False, "WRITE_GRAD": False, "REDUCE": 0}


def _aot_compile(sdt: str, tdt: str, flags: dict[str, int], c: int):  # type: ignore[no-untyped-def]
    """Compile the kernel for an H100 (sm_90) without a GPU, as a contiguous-input launch would."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kdloss.kernels._kd_triton import kd_rows_kernel as kernel

    block = KS.column_block(c)
    names = list(kernel.arg_names)
    types = {"S": f"*{sdt}", "TT": f"*{tdt}", "LABELS": "*i64", "MASK": "*i1", "LOSS": "*fp32", "VALID": "*i1"}
    types.update(GRAD=f"*{sdt}", C="i32", ignore_index="i32")
    types.update({n: "i32" for n in ("stride_sr", "stride_tr", "stride_gr")})
    types.update({n: "fp32" for n in ("temperature", "kl_weight", "grad_kl_weight", "ce_weight", "denom_per_row")})
    types.update(OUT="*fp32", SCALE="*fp32", COUNTER="*i32", n_rows="i32")
    consts: dict[str, object] = {**flags, "BLOCK": block, "RBLOCK": KS.REDUCE_BLOCK, "stride_sc": 1, "stride_tc": 1}
    sig = {n: "constexpr" if n in consts else types[n] for n in names}
    aligned = ("S", "TT", "LABELS", "MASK", "LOSS", "VALID", "GRAD", "stride_sr", "stride_tr", "stride_gr", "C")
    src = ASTSource(
        fn=kernel,
        signature=sig,
        constexprs={(names.index(n),): v for n, v in consts.items()},
        attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned},
    )
    options = {"num_warps": 4 if block <= 1024 else 8, "enable_fp_fusion": True}
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


@pytest.mark.skipif(INTERPRET, reason="the interpreter replaces the compiler")
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize(
    ("sdt", "tdt", "flags", "c"),
    [
        ("bf16", "bf16", {**_FLAGS_OFF, "HAS_LABELS": True, "HAS_CE": True, "WRITE_GRAD": True, "REDUCE": 2}, 128256),
        ("fp32", "fp32", {**_FLAGS_OFF, "HAS_MASK": True, "WRITE_GRAD": True}, 1000),
        ("fp16", "fp32", {**_FLAGS_OFF, "REDUCE": 1}, 100),
    ],
    ids=["lm-bf16-ce", "imagenet-fp32-mask", "cifar-mixed-nograd"],
)
def test_compiles_for_h100_without_gpu(sdt: str, tdt: str, flags: dict[str, int], c: int, tmp_path: Path) -> None:
    """Triton's real front end and ptxas (not the interpreter) accept the kernel; wide loads, no spills.

    The interpreter runs Python semantics and misses errors that only the compiler reports (a
    non-constexpr global, a loop-carried type change), so the kernel is also compiled ahead of time
    for sm_90 here; this needs no GPU.
    """
    try:
        compiled = _aot_compile(sdt, tdt, flags, c)
    except ImportError as exc:  # a Triton without these entry points
        pytest.skip(f"ahead-of-time compilation API not available: {exc}")
    assert_no_local_memory(compiled, tmp_path)
    ptx = compiled.asm["ptx"]
    if flags["REDUCE"]:  # the ticket: one acquire-release atomic at GPU scope, then uncached reads
        assert "atom.global.gpu.acq_rel.add" in ptx
        assert "ld.volatile.global" in ptx
    else:
        assert "atom." not in ptx
    if c >= 1000:  # contiguous rows: 16-byte vector loads and gradient stores
        assert "ld.global.v4" in ptx
        assert "st.global.v4" in ptx


# --------------------------------------------------------------------------- kernel cases


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def _check(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.shape == ref.shape
    assert out.dtype == ref.dtype
    assert torch.equal(torch.isfinite(out), torch.isfinite(ref))
    fin = torch.isfinite(ref)
    if dtype == torch.float32:
        torch.testing.assert_close(out[fin], ref[fin], rtol=1e-5, atol=1e-5)
    else:
        assert _rel(out[fin], ref[fin]) <= 1e-2


def _logits(shape: tuple[int, ...], dtype: torch.dtype, *, scale: float = 3.0, transpose: bool = False) -> torch.Tensor:
    if transpose:  # non-contiguous: the class dimension has a stride > 1
        x = (torch.randn(*shape[:-2], shape[-1], shape[-2]) * scale).transpose(-1, -2)
    else:
        x = torch.randn(shape) * scale
    return x.to(DEVICE or "cpu", dtype)


def _fused_vs_eager(
    monkeypatch: pytest.MonkeyPatch,
    fn,  # type: ignore[no-untyped-def]
    s: torch.Tensor,
    t: torch.Tensor,
    dtype: torch.dtype,
    weights: bool,
    **kw,  # type: ignore[no-untyped-def]
) -> None:
    results = []
    w = None
    for fused in (False, True):
        monkeypatch.setattr(K, "use_fused", lambda a, b, _f=fused: _f)
        leaf = s.detach().clone().requires_grad_(True)
        out = fn(leaf, t, **kw)
        if w is None:
            w = torch.rand(out.shape, device=out.device) + 0.5 if weights else torch.ones_like(out)
        (out * w).sum().backward()
        assert leaf.grad is not None
        results.append((out.detach(), leaf.grad))
    (ref, gref), (got, g) = results
    _check(got, ref, dtype)
    _check(g, gref, dtype)


DTYPE_TEMPS = [(torch.float32, 1.0), (torch.float32, 2.5), (torch.bfloat16, 2.5), (torch.float16, 1.0)]
SHAPES = [((5, 37), 16), ((3, 4, 130), 32), ((6, 1), None), ((4, 300), None)]


@needs_kernel
@pytest.mark.parametrize(("dtype", "temperature"), DTYPE_TEMPS, ids=str)
@pytest.mark.parametrize(("shape", "block"), SHAPES, ids=str)
def test_rows_match_eager(shape: tuple[int, ...], block: int | None, dtype: torch.dtype, temperature: float) -> None:
    torch.manual_seed(0)
    s, t = _logits(shape, dtype), _logits(shape, dtype)
    leaf = s.clone().requires_grad_(True)
    loss, valid = K.fused_kd_rows(leaf, t, temperature=temperature, block_size=block)
    assert valid.all()
    assert loss.dtype == torch.float32
    w = torch.rand(loss.shape, device=loss.device)
    (loss * w).sum().backward()
    ref_leaf = s.clone().requires_grad_(True)
    ref = soft_kl(ref_leaf, t, temperature=temperature, reduction="none")
    (ref * w).sum().backward()
    _check(loss.detach(), ref.detach(), dtype)
    assert leaf.grad is not None
    assert ref_leaf.grad is not None
    _check(leaf.grad, ref_leaf.grad, dtype)


@needs_kernel
@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "batchmean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_soft_kl_dispatch_reductions(monkeypatch: pytest.MonkeyPatch, reduction: str, dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    s, t = _logits((3, 4, 37), dtype), _logits((3, 4, 37), dtype)
    mask = torch.rand(3, 4, device=s.device) > 0.3
    _fused_vs_eager(
        monkeypatch, soft_kl, s, t, dtype, reduction == "none", temperature=2.0, reduction=reduction, mask=mask
    )


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("where", ["student", "teacher", "both", "student_row", "teacher_row", "masked_row"])
def test_minus_inf(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, where: str) -> None:
    """-inf entries and fully -inf rows: same values (0, finite or 1e30-large) and gradients as eager."""
    torch.manual_seed(2)
    s, t = _logits((6, 37), dtype), _logits((6, 37), dtype)
    ninf = float("-inf")
    if where in ("student", "both"):
        s[:, [0, 5, 36]] = ninf
    if where in ("teacher", "both"):
        t[:, [5, 7, 20]] = ninf
    if where == "student_row":
        s[2] = ninf
    if where == "teacher_row":
        t[4] = ninf
    mask = None
    if where == "masked_row":
        s[1] = ninf
        mask = torch.ones(6, dtype=torch.bool, device=s.device)
        mask[3] = False
    for reduction in ("none", "batchmean"):
        _fused_vs_eager(monkeypatch, soft_kl, s, t, dtype, True, temperature=1.5, reduction=reduction, mask=mask)


@needs_kernel
def test_all_rows_masked_gives_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(K, "use_fused", lambda a, b: True)
    s = _logits((4, 37), torch.float32).requires_grad_(True)
    out = soft_kl(s, _logits((4, 37), torch.float32), mask=torch.zeros(4, dtype=torch.bool, device=s.device))
    out.backward()
    assert out.item() == 0.0
    assert s.grad is not None
    assert torch.count_nonzero(s.grad) == 0


@needs_kernel
@pytest.mark.parametrize("layout", ["transposed", "row_slice", "teacher_expanded"])
def test_non_contiguous(monkeypatch: pytest.MonkeyPatch, layout: str) -> None:
    torch.manual_seed(3)
    if layout == "transposed":
        s, t = _logits((5, 37), torch.float32, transpose=True), _logits((5, 37), torch.float32, transpose=True)
        assert not s.is_contiguous()
    elif layout == "row_slice":
        s, t = _logits((10, 37), torch.float32)[::2], _logits((10, 40), torch.float32)[::2, 3:]
    else:
        s, t = _logits((5, 37), torch.float32), _logits((1, 37), torch.float32).expand(5, 37)
    _fused_vs_eager(monkeypatch, soft_kl, s, t, torch.float32, True, temperature=2.0, reduction="none")


@needs_kernel
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("reduction", ["none", "sum", "batchmean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kd_ce_fused_vs_eager(
    monkeypatch: pytest.MonkeyPatch, alpha: float, reduction: str, dtype: torch.dtype
) -> None:
    torch.manual_seed(4)
    s, t = _logits((3, 5, 37), dtype), _logits((3, 5, 37), dtype)
    labels = torch.randint(0, 37, (3, 5), device=s.device)
    labels[0, 1] = -100
    s[1, 2] = float("-inf")  # a fully -inf student row: does not count
    s[2, :, 4] = float("-inf")
    t[0, 3, :7] = float("-inf")
    mask = torch.rand(3, 5, device=s.device) > 0.2
    _fused_vs_eager(
        monkeypatch,
        kd_ce_loss,
        s,
        t,
        dtype,
        reduction == "none",
        labels=labels,
        alpha=alpha,
        temperature=3.0,
        reduction=reduction,
        mask=mask,
    )


@needs_kernel
def test_strided_mask_and_labels(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(7)
    s, t = _logits((6, 37), torch.float32), _logits((6, 37), torch.float32)
    mask = (torch.rand(12, device=s.device) > 0.4)[::2]
    labels = torch.randint(0, 37, (12,), device=s.device)[::2]
    labels[1] = -100
    assert mask.stride(0) == 2
    _fused_vs_eager(
        monkeypatch, kd_ce_loss, s, t, torch.float32, True, labels=labels, mask=mask, alpha=0.5, reduction="none"
    )


@needs_kernel
def test_no_grad_writes_no_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    from kdloss.kernels.soft_kl import _FusedKD

    seen: list[bool] = []
    original = _FusedKD.forward

    def spy(ctx, *args):  # type: ignore[no-untyped-def]
        out = original(ctx, *args)
        seen.append(ctx.grad is not None)
        return out

    monkeypatch.setattr(_FusedKD, "forward", staticmethod(spy))
    s = _logits((3, 37), torch.float32).requires_grad_(True)
    with torch.no_grad():
        K.fused_kd_rows(s, s.detach() + 1, temperature=1.0)
    K.fused_kd_rows(s, s.detach() + 1, temperature=1.0)
    assert seen == [False, True]


@needs_kernel
def test_soft_kl_labels_ignore_index(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(5)
    s, t = _logits((8, 37), torch.float32), _logits((8, 37), torch.float32)
    labels = torch.tensor([1, 7, 7, 2, 7, 0, 3, 7], device=s.device)
    _fused_vs_eager(monkeypatch, soft_kl, s, t, torch.float32, False, labels=labels, ignore_index=7)


@needs_kernel
def test_forward_without_grad_and_single_backward() -> None:
    s, t = _logits((4, 37), torch.float32), _logits((4, 37), torch.float32)
    with torch.no_grad():
        loss, _ = K.fused_kd_rows(s, t, temperature=1.0)
    torch.testing.assert_close(loss, soft_kl(s, t, reduction="none"), rtol=1e-5, atol=1e-5)
    leaf = s.clone().requires_grad_(True)
    out = K.fused_kd_rows(leaf, t, temperature=1.0)[0].sum()
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="can run only once"):
        out.backward()


@needs_kernel
def test_empty_batch_and_double_backward(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(K, "use_fused", lambda a, b: True)
    s = _logits((0, 37), torch.float32).requires_grad_(True)
    out = soft_kl(s, _logits((0, 37), torch.float32))
    (g,) = torch.autograd.grad(out, s)
    assert out.item() == 0.0
    assert g.shape == (0, 37)
    s = _logits((3, 37), torch.float32).requires_grad_(True)
    (g,) = torch.autograd.grad(soft_kl(s, _logits((3, 37), torch.float32)), s, create_graph=True)
    with pytest.raises(RuntimeError, match=r"twice|once_differentiable|does not require grad"):
        torch.autograd.grad(g.sum(), s)


@needs_kernel
def test_kernel_is_interpreted_on_cpu() -> None:
    """On CPU the kernel object is Triton's interpreter, so CPU tests really execute the kernel body."""
    from kdloss.kernels._kd_triton import kd_rows_kernel

    if DEVICE == "cpu":
        assert type(kd_rows_kernel).__name__ == "InterpretedFunction"
    else:
        assert type(kd_rows_kernel).__name__ == "JITFunction"


# --------------------------------------------------------------------------- GPU only: the benchmark sizes

GPU_SIZES = [
    (256, 10, torch.float32),
    (256, 100, torch.float32),
    (4096, 1000, torch.float32),
    (4096, 1000, torch.bfloat16),
    (8192, 32000, torch.bfloat16),
    (4096, 128256, torch.bfloat16),
]


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA (the benchmark sizes)")
@pytest.mark.parametrize(("n", "c", "dtype"), GPU_SIZES, ids=str)
def test_benchmark_sizes_on_gpu(monkeypatch: pytest.MonkeyPatch, n: int, c: int, dtype: torch.dtype) -> None:
    torch.manual_seed(6)
    s, t = _logits((n, c), dtype), _logits((n, c), dtype)
    s[0] = float("-inf")  # a fully -inf row
    s[1, :3] = float("-inf")
    t[2, c // 2 :] = float("-inf")
    labels = torch.randint(0, c, (n,), device=s.device)
    _fused_vs_eager(monkeypatch, soft_kl, s, t, dtype, False, temperature=4.0)
    _fused_vs_eager(monkeypatch, kd_ce_loss, s, t, dtype, False, labels=labels, alpha=0.9, temperature=4.0)
    # non-contiguous: every other column of a wider buffer (class stride 2)
    wide = _logits((n, 2 * c), dtype)[:, ::2]
    _fused_vs_eager(monkeypatch, soft_kl, wide, t, dtype, True, temperature=2.0, reduction="none")


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA")
def test_no_host_sync_and_cuda_graph() -> None:
    """256 x 100: the fused soft_kl forward+backward never synchronises and can be captured in a CUDA graph."""
    s = _logits((256, 100), torch.float32).requires_grad_(True)
    t = _logits((256, 100), torch.float32)
    soft_kl(s, t, temperature=4.0).backward()  # warm-up (compiles the kernel)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = soft_kl(s, t, temperature=4.0)
        (g,) = torch.autograd.grad(loss, s)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        soft_kl(s, t, temperature=4.0)
    torch.cuda.current_stream().wait_stream(side)
    with torch.no_grad(), torch.cuda.graph(graph):
        static_out = soft_kl(s, t, temperature=4.0)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(static_out, loss.detach())
    assert torch.isfinite(g).all()


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA")
def test_compile_fullgraph_on_cuda_uses_eager_path() -> None:
    """Under torch.compile the dispatch folds to the eager path (no graph break) and agrees with the kernel."""
    s, t = _logits((64, 1000), torch.bfloat16), _logits((64, 1000), torch.bfloat16)
    compiled = torch.compile(lambda a, b: soft_kl(a, b, temperature=2.0), fullgraph=True)
    torch.testing.assert_close(compiled(s, t), soft_kl(s, t, temperature=2.0), rtol=1e-4, atol=1e-5)


@needs_kernel
def test_random_inputs_match_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """Property check over random shapes, block sizes, temperatures, -inf patterns, masks, labels and alpha."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    @settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(
        rows=st.integers(1, 4),
        c=st.integers(1, 70),
        block=st.sampled_from([16, 32, None]),
        temperature=st.floats(0.5, 5.0),
        alpha=st.sampled_from([1.0, 0.6, 0.0]),
        seed=st.integers(0, 2**16),
        p_inf=st.sampled_from([0.0, 0.2, 0.9]),
    )
    def check(rows: int, c: int, block: int | None, temperature: float, alpha: float, seed: int, p_inf: float) -> None:
        g = torch.Generator().manual_seed(seed)
        s = torch.randn(rows, c, generator=g) * 4
        t = torch.randn(rows, c, generator=g) * 4
        s[torch.rand(rows, c, generator=g) < p_inf] = float("-inf")
        t[torch.rand(rows, c, generator=g) < p_inf] = float("-inf")
        mask = torch.rand(rows, generator=g) > 0.2
        labels = torch.randint(0, c, (rows,), generator=g)
        labels[torch.rand(rows, generator=g) < 0.2] = -100
        dev = DEVICE or "cpu"
        s, t, mask, labels = s.to(dev), t.to(dev), mask.to(dev), labels.to(dev)
        ref_s = s.clone().requires_grad_(True)
        ref = kd_ce_loss(ref_s, t, labels, alpha=alpha, temperature=temperature, reduction="none", mask=mask)
        got_s = s.clone().requires_grad_(True)
        got, valid = K.fused_kd_rows(
            got_s,
            t,
            temperature=temperature,
            mask=mask,
            labels=labels,
            kl_weight=alpha,
            ce_weight=1.0 - alpha,
            block_size=block,
        )
        w = torch.rand(rows, generator=g).to(dev)
        (ref * w).sum().backward()
        (got * w).sum().backward()
        assert ref_s.grad is not None
        assert got_s.grad is not None
        _check(got.detach(), ref.detach(), torch.float32)
        _check(got_s.grad, ref_s.grad, torch.float32)
        counts = mask & (labels != -100) & (s > float("-inf")).any(-1) & (t > float("-inf")).any(-1)
        assert torch.equal(valid, counts)

    check()


# --------------------------------------------------------------------------- the reducing launch


@needs_kernel
@pytest.mark.parametrize("reduction", ["sum", "mean", "batchmean"])
def test_reduced_loss_matches_rows_and_resets_its_counter(monkeypatch: pytest.MonkeyPatch, reduction: str) -> None:
    """The single-launch reduction equals the per-row losses reduced in Python, call after call.

    The last program sums the rows in blocks; with the block cut to 16, 40 rows take three
    blocks, the last one partial. The ticket counter is back at 0 after every launch; a counter
    left behind would make the next launch never find its last program and return garbage.
    """
    monkeypatch.setattr(KS, "REDUCE_BLOCK", 16)
    torch.manual_seed(8)
    s, t = _logits((40, 5), torch.float32), _logits((40, 5), torch.float32)
    mask = torch.rand(40, device=s.device) > 0.3
    rows, valid = K.fused_kd_rows(s, t, temperature=2.0, mask=mask)
    want = rows.sum()
    if reduction == "batchmean":
        want = want / valid.sum()
    elif reduction == "mean":
        want = want / (valid.sum() * 5)
    outs = [K.fused_kd_loss(s, t, temperature=2.0, reduction=reduction, elements_per_row=5, mask=mask) for _ in "ab"]
    assert outs[0].shape == ()
    torch.testing.assert_close(outs[0], want, rtol=1e-5, atol=1e-6)
    assert torch.equal(outs[0], outs[1])  # same bits: the rows are summed in index order
    assert KS._counters
    assert all(int(c) == 0 for c in KS._counters.values())


@needs_kernel
def test_reduced_gradient_is_scaled_by_the_count() -> None:
    torch.manual_seed(9)
    s, t = _logits((7, 11), torch.float32), _logits((7, 11), torch.float32)
    mask = torch.tensor([1, 0, 1, 1, 0, 1, 1], dtype=torch.bool, device=s.device)
    leaf = s.clone().requires_grad_(True)
    (K.fused_kd_loss(leaf, t, temperature=1.5, reduction="batchmean", mask=mask) * 3.0).backward()
    ref = s.clone().requires_grad_(True)
    (soft_kl(ref, t, temperature=1.5, mask=mask, reduction="sum") * 3.0 / 5).backward()
    assert leaf.grad is not None
    assert ref.grad is not None
    torch.testing.assert_close(leaf.grad, ref.grad, rtol=1e-5, atol=1e-6)


@needs_kernel
def test_fused_loss_none_gives_the_rows_and_bad_reductions_raise() -> None:
    s, t = _logits((3, 7), torch.float32), _logits((3, 7), torch.float32)
    rows, _ = K.fused_kd_rows(s, t, temperature=2.0)
    assert torch.equal(K.fused_kd_loss(s, t, temperature=2.0, reduction="none"), rows)
    with pytest.raises(ValueError, match="reduction must be one of 'none', 'sum', 'mean', 'batchmean', got 'avg'"):
        K.fused_kd_loss(s, t, temperature=1.0, reduction="avg")


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA")
@pytest.mark.parametrize(("n", "c"), [(256, 100), (4096, 1000)])
def test_reduced_forward_is_one_launch(n: int, c: int) -> None:
    """The target: the 256 x 100 forward (with its reduction) is one kernel launch."""
    from torch.profiler import ProfilerActivity, profile

    s, t = _logits((n, c), torch.float32), _logits((n, c), torch.float32)
    soft_kl(s, t, temperature=4.0)  # compile the kernel, allocate the counter
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof, torch.no_grad():
        soft_kl(s, t, temperature=4.0)
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type.name == "CUDA"]
    assert len(kernels) == 1, kernels
