"""Helpers shared by the tests/test_methods_*.py files (kept local to them)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

F64 = torch.float64
ATOL = 1e-6


def leaf(*shape: int, seed: int = 0, scale: float = 1.0, dtype: torch.dtype = F64) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=F64)).to(dtype).requires_grad_(True)


def assert_matches_reference(
    fn: Callable[..., Tensor],
    ref: Callable[..., Tensor],
    inputs: Sequence[Tensor],
    grad_inputs: Sequence[Tensor],
    atol: float = ATOL,
) -> None:
    """Values and gradients (w.r.t. ``grad_inputs``) of ``fn`` equal those of ``ref`` in float64."""
    got = fn(*inputs)
    want = ref(*inputs)
    assert got.dtype == F64
    torch.testing.assert_close(got, want.to(got.dtype), atol=atol, rtol=atol)
    g_got = torch.autograd.grad(got.sum(), list(grad_inputs), allow_unused=True)
    g_want = torch.autograd.grad(want.sum(), list(grad_inputs), allow_unused=True)
    for a, b in zip(g_got, g_want):
        assert a is not None
        assert b is not None
        torch.testing.assert_close(a, b, atol=atol, rtol=atol)


def assert_teacher_detached(fn: Callable[..., Tensor], student: Tensor, teacher: Tensor) -> None:
    s = student.detach().clone().requires_grad_(True)
    t = teacher.detach().clone().requires_grad_(True)
    fn(s, t).sum().backward()
    assert t.grad is None
    assert s.grad is not None


def assert_finite_with_grad(loss: Tensor, *inputs: Tensor) -> None:
    assert torch.isfinite(loss).all(), loss
    grads = torch.autograd.grad(loss.sum(), list(inputs), allow_unused=True)
    for g in grads:
        if g is not None:
            assert torch.isfinite(g).all()


def single_thread() -> Iterator[None]:
    """Run a module with one intra-op thread, restored afterwards (benchmarks/: conftest.py does not reach it).

    These tensors are tiny: on a shared CI machine with few cores, several threads per op cost far
    more in synchronisation than they gain (measured: DKD forward+backward at (32, 100) took 296 ms
    with 2 threads on a loaded 2-core machine, 4.5 ms with 1).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
