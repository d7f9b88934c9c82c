"""Every loss on a CUDA device: the same values and gradients as on the CPU, and no host synchronisation.

The CPU-only CI proves the eager formulas (float64 references, gradcheck, operator counts) and, on
``meta`` tensors, that no loss reads a value on the host. On a GPU the code takes other branches:
the robust KL form instead of the CPU's plain one, the fused Triton kernels where they apply, and
device-side checks. These tests run each loss of ``tests/test_op_counts.py`` there, in float32,
with the fused kernels off and on, against the same call on the CPU in float64, and then once more
under ``torch.cuda.set_sync_debug_mode("error")``, which raises at any synchronising operation.
They need a GPU (marked ``gpu``; ``scripts/gpu_check.sh`` runs them).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import Tensor

from kdloss.kernels import set_kernels_mode
from tests.helpers import requires_cuda
from tests.test_op_counts import CASES, _inputs

pytestmark = [pytest.mark.gpu, requires_cuda]


def _to(x: object, **kw: object) -> object:
    if isinstance(x, Tensor):
        return x.to(**kw) if x.is_floating_point() else x.to(device=kw.get("device", x.device))  # type: ignore[arg-type]
    if isinstance(x, list):
        return [_to(v, **kw) for v in x]
    if isinstance(x, dict):
        return {k: _to(v, **kw) for k, v in x.items()}
    raise TypeError(f"unexpected input {type(x).__name__}")


def _run(name: str, x: dict[str, object]) -> tuple[Tensor, list[Tensor]]:
    grad_of, ours, _ = CASES[name]
    leaves = [t.detach().clone().requires_grad_(True) for t in grad_of(x)]
    out = ours(x, *leaves)
    grads = torch.autograd.grad(out, leaves, allow_unused=True)
    return out.detach(), [g if g is not None else torch.zeros_like(v) for g, v in zip(grads, leaves)]


@pytest.fixture(params=["off", "verify"], ids=["eager", "kernels"])
def kernels(request: pytest.FixtureRequest) -> Iterator[str]:
    set_kernels_mode(request.param)
    try:
        yield request.param
    finally:
        set_kernels_mode(None)


@pytest.mark.parametrize("name", sorted(CASES))
def test_cuda_matches_cpu_float64_and_does_not_synchronise(name: str, kernels: str) -> None:
    x = _inputs()
    want, want_grads = _run(name, _to(x, dtype=torch.float64))  # type: ignore[arg-type]
    on_gpu: dict[str, object] = _to(x, device="cuda")  # type: ignore[assignment]
    got, got_grads = _run(name, on_gpu)  # also the first call: a kernel's self-check runs here
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.double().cpu(), want, rtol=1e-4, atol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g.double().cpu(), w, rtol=1e-4, atol=1e-5)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _run(name, on_gpu)
    finally:
        torch.cuda.set_sync_debug_mode("default")
