"""The fused Triton attention-transfer kernels (behind :func:`kdloss.functional.attention_loss`) against eager.

Run under Triton's interpreter on CPU, or on a CUDA machine, as ``tests/triton_harness.py`` says::

    TRITON_INTERPRET=1 PYTHONPATH=. python -m pytest -q tests/test_attention_kernel.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import kdloss.kernels as K
import kdloss.kernels.attention as KA
from kdloss.functional import attention_loss
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

N_CASES = 20  # tests the interpreter subprocess must pass


test_interpreter_subprocess = interpreter_subprocess_test(__file__, N_CASES)


@outer_run_only
def test_attention_imports_without_triton() -> None:
    """With ``triton`` unimportable, attention_loss imports and runs its eager path."""
    code = "from kdloss.functional import attention_loss as at\nx = torch.ones(2, 3, 4, 4)\nprint(float(at(x, x)))"
    assert eager_without_triton("_attention_triton", code) == ["0.0"]


def test_cpu_takes_the_eager_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU tensors never reach the kernel."""

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("fused_attention_rows called on CPU")

    monkeypatch.setattr(K, "fused_attention_rows", boom)
    out = attention_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4))
    assert torch.isfinite(out)
    assert not K.attention_fusable([torch.zeros(2, 3, 4, 4)], [torch.zeros(2, 5, 4, 4)], 2.0)


# --------------------------------------------------------------------------- kernel cases


def _maps(shapes: list[tuple[int, int, int, int]], dtype: torch.dtype, layout: str, seed: int) -> list[torch.Tensor]:
    assert DEVICE is not None
    g = torch.Generator().manual_seed(seed)
    out = []
    for b, c, h, w in shapes:
        if layout == "transposed":  # a non-contiguous view: (B, C, W, H) storage seen as (B, C, H, W)
            x = torch.randn(b, c, w, h, generator=g).transpose(2, 3)
        elif layout == "sliced":  # every other channel of a wider map
            x = torch.randn(b, 2 * c, h, w, generator=g)[:, ::2]
        else:
            x = torch.randn(b, c, h, w, generator=g)
        x = x.to(device=DEVICE, dtype=dtype)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        out.append(x)
    return out


def _compare(
    s: list[torch.Tensor], t: list[torch.Tensor], beta: float, dtype: torch.dtype, reduction: str = "none"
) -> None:
    s_ref = [x.detach().clone().requires_grad_(True) for x in s]
    s_k = [x.detach().clone().requires_grad_(True) for x in s]
    t_req = [x.detach().clone().requires_grad_(True) for x in t]
    ref = attention_loss(s_ref, t, beta=beta, reduction="none")  # eager: not CUDA (or kernels off)
    rows = K.fused_attention_rows(s_k, t_req, beta=beta)
    assert rows.dtype == torch.float32
    assert rows.shape == ref.shape
    rtol, atol = (1e-5, 1e-6) if dtype == torch.float32 else (1e-2, 1e-5)
    torch.testing.assert_close(rows, ref, rtol=rtol, atol=atol)
    w = torch.arange(1, ref.shape[0] + 1, dtype=torch.float32, device=ref.device)
    (ref * w).sum().backward()
    (rows * w).sum().backward()
    for a, b in zip(s_k, s_ref):
        assert a.grad is not None
        assert b.grad is not None
        assert a.grad.dtype == a.dtype
        assert a.grad.shape == a.shape
        torch.testing.assert_close(a.grad.float(), b.grad.float(), rtol=rtol, atol=atol * 10)
    assert all(x.grad is None for x in t_req)  # teacher detached


@pytest.fixture(autouse=True)
def _eager_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA the reference must be the eager path: keep attention_loss from dispatching to the kernel."""
    monkeypatch.setenv("KDLOSS_KERNELS", "off")


SHAPES_3 = [
    [(2, 4, 8, 8), (2, 8, 5, 7), (2, 40, 3, 3)],
    [(3, 16, 8, 8), (3, 2, 5, 7), (3, 1, 1, 1)],
]
T_CHANNELS = [(6, 33, 12), (1, 40, 7)]


@needs_kernel
@pytest.mark.parametrize("case", [0, 1])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed", "sliced"])
def test_three_pairs_fp32(case: int, layout: str) -> None:
    s_shapes = SHAPES_3[case]
    t_shapes = [(b, ct, h, w) for (b, _, h, w), ct in zip(s_shapes, T_CHANNELS[case])]
    s = _maps(s_shapes, torch.float32, layout, seed=case)
    t = _maps(t_shapes, torch.float32, "contiguous", seed=10 + case)
    _compare(s, t, beta=1000.0 if case else 1.0, dtype=torch.float32)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype: torch.dtype) -> None:
    s = _maps(SHAPES_3[0], dtype, "channels_last", seed=3)
    t = _maps([(2, 6, 8, 8), (2, 3, 5, 7), (2, 9, 3, 3)], dtype, "contiguous", seed=4)
    _compare(s, t, beta=2.0, dtype=dtype)


@needs_kernel
def test_all_zero_maps_and_five_pairs() -> None:
    """Zero student / teacher maps (the eps branch of the normaliser) and two launches for 5 pairs."""
    shapes = [(2, 3, 4, 4), (2, 5, 2, 3), (2, 4, 4, 4), (2, 2, 3, 3), (2, 6, 2, 2)]
    s = _maps(shapes, torch.float32, "contiguous", seed=5)
    t = _maps(shapes, torch.float32, "contiguous", seed=6)
    s[0] = torch.zeros_like(s[0])
    t[1] = torch.zeros_like(t[1])
    s[2][0] = 0.0  # one sample's map only
    _compare(s, t, beta=1.0, dtype=torch.float32)


@needs_kernel
def test_no_grad() -> None:
    s = _maps([(2, 3, 4, 4)], torch.float32, "contiguous", seed=7)
    t = _maps([(2, 5, 4, 4)], torch.float32, "contiguous", seed=8)
    with torch.no_grad():
        rows = K.fused_attention_rows([s[0].requires_grad_(True)], t, beta=1.0)
    assert not rows.requires_grad
    torch.testing.assert_close(rows, attention_loss(s, t, reduction="none"), rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not HAS_TRITON or INTERPRET, reason="needs CUDA")
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_dispatch_on_cuda(monkeypatch: pytest.MonkeyPatch, reduction: str) -> None:
    """On CUDA attention_loss takes the kernel for p = 2 and equal spatial sizes, eager otherwise."""
    s = [torch.randn(4, 8, 8, 8, device="cuda"), torch.randn(4, 16, 4, 4, device="cuda")]
    t = [torch.randn(4, 12, 8, 8, device="cuda"), torch.randn(4, 32, 4, 4, device="cuda")]
    ref = attention_loss(s, t, reduction=reduction, beta=3.0)
    monkeypatch.delenv("KDLOSS_KERNELS")
    assert K.attention_fusable(s, t, 2.0)
    assert not K.attention_fusable(s, t, 3.0)
    torch.testing.assert_close(attention_loss(s, t, reduction=reduction, beta=3.0), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not HAS_TRITON or INTERPRET, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_benchmark_size_on_gpu(dtype: torch.dtype) -> None:
    """The WRN-CIFAR benchmark case (benchmarks/cases.py): B = 128, 3 pairs, 32x32 / 16x16 / 8x8."""
    s_shapes = [(128, 16, 32, 32), (128, 32, 16, 16), (128, 64, 8, 8)]
    s = _maps(s_shapes, dtype, "contiguous", seed=11)
    t = _maps([(b, 2 * c, h, w) for b, c, h, w in s_shapes], dtype, "contiguous", seed=12)
    _compare(s, t, beta=1000.0, dtype=dtype)


def _aot_compile(kernel_name: str, dt: str, npairs: int, hw: int):  # type: ignore[no-untyped-def]
    """Compile a kernel for an H100 (sm_90) without a GPU."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import kdloss.kernels._attention_triton as ka

    kernel = getattr(ka, kernel_name)
    cb, hwb = KA.attention_tiles(hw)
    names = list(kernel.arg_names)
    consts: dict[str, object] = {"NPAIRS": npairs, "CB": cb, "HWB": hwb}
    if "SAVE" in names:
        consts["SAVE"] = True
    types: dict[str, str] = {}
    for n in names:
        if n[0] in "STG" and n[1:].isdigit():
            types[n] = f"*{dt}"
        elif n in ("LOSS", "AS", "AT", "NORM", "GRAD_OUT"):
            types[n] = "*fp32"
        elif n in ("beta", "eps"):
            types[n] = "fp32"
        else:
            types[n] = "i32"
    sig = {n: "constexpr" if n in consts else types[n] for n in names}
    src = ASTSource(fn=kernel, signature=sig, constexprs={(names.index(n),): v for n, v in consts.items()})
    options = {"num_warps": 4 if cb * hwb <= 2048 else 8, "enable_fp_fusion": True}
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


@pytest.mark.skipif(INTERPRET, reason="the interpreter replaces the compiler")
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize(
    ("kernel_name", "dt", "npairs", "hw"),
    [("attention_fwd_kernel", "fp32", 3, 1024), ("attention_bwd_kernel", "bf16", 3, 1024)],
    ids=["fwd-fp32", "bwd-bf16"],
)
def test_compiles_for_h100_without_gpu(kernel_name: str, dt: str, npairs: int, hw: int, tmp_path: Path) -> None:
    """Triton's real front end and ptxas (not the interpreter) accept the kernels; no local memory, no spills."""
    try:
        compiled = _aot_compile(kernel_name, dt, npairs, hw)
    except ImportError as exc:  # a Triton without these entry points
        pytest.skip(f"ahead-of-time compilation API not available: {exc}")
    assert_no_local_memory(compiled, tmp_path)


def test_pairs_must_share_the_batch_size() -> None:
    s = [torch.randn(2, 3, 4, 4), torch.randn(3, 3, 2, 2)]
    t = [torch.randn(2, 5, 4, 4), torch.randn(3, 5, 2, 2)]
    with pytest.raises(ValueError, match=r"student_features\[0\] and student_features\[1\] must have the same batch"):
        attention_loss(s, t)


def _force_and_count_kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Force the dispatch on and count the kernel's launches: one entry in the returned list per call."""
    calls: list[int] = []
    real = K.fused_attention_rows

    def counted(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(KA, "use_fused", lambda a, b, kernel="soft_kl": True)
    monkeypatch.setattr(K, "fused_attention_rows", counted)
    return calls


@needs_kernel
@pytest.mark.parametrize("reduction", ["none", "mean", "batchmean", "sum"])
def test_attention_loss_dispatch(monkeypatch: pytest.MonkeyPatch, reduction: str) -> None:
    """With the dispatch forced on, attention_loss goes through the kernel (p = 2, equal sizes) and matches eager."""
    s = _maps([(3, 4, 8, 8), (3, 8, 5, 7), (3, 16, 3, 3)], torch.float32, "contiguous", seed=20)
    t = _maps([(3, 6, 8, 8), (3, 2, 5, 7), (3, 9, 3, 3)], torch.float32, "contiguous", seed=21)
    ref = attention_loss(s, t, beta=5.0, reduction=reduction)
    calls = _force_and_count_kernel_calls(monkeypatch)
    torch.testing.assert_close(attention_loss(s, t, beta=5.0, reduction=reduction), ref, rtol=1e-5, atol=1e-6)
    assert calls == [1]
    attention_loss(s, t, p=3.0)  # other p: eager
    attention_loss([s[0]], [t[0][:, :, :4, :4]], pool="maps")  # differing sizes, energy maps pooled: eager
    assert calls == [1]


@needs_kernel
@pytest.mark.parametrize("pool", ["features", "maps"])
def test_unequal_sizes_dispatch(monkeypatch: pytest.MonkeyPatch, pool: str) -> None:
    """Pairs of different (and non-square) spatial sizes: with ``pool="features"`` the feature maps are
    pooled first and the kernel runs on the pooled pairs; with ``pool="maps"`` the eager path runs.
    Values and gradients equal the eager path's either way."""
    s = _maps([(3, 4, 8, 6), (3, 8, 5, 7), (3, 2, 4, 4)], torch.float32, "contiguous", seed=22)
    t = _maps([(3, 6, 4, 3), (3, 2, 3, 2), (3, 9, 8, 2)], torch.float32, "contiguous", seed=23)
    s_ref = [x.detach().clone().requires_grad_(True) for x in s]
    s_k = [x.detach().clone().requires_grad_(True) for x in s]
    ref = attention_loss(s_ref, t, beta=7.0, reduction="none", pool=pool)  # type: ignore[arg-type]
    calls = _force_and_count_kernel_calls(monkeypatch)
    out = attention_loss(s_k, t, beta=7.0, reduction="none", pool=pool)  # type: ignore[arg-type]
    assert calls == ([1] if pool == "features" else [])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    w = torch.arange(1, 4, dtype=torch.float32, device=out.device)
    (ref * w).sum().backward()
    (out * w).sum().backward()
    for a, b in zip(s_k, s_ref):
        assert a.grad is not None
        assert b.grad is not None
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)
