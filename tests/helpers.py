"""What the tests share: the dtype/tolerance table, the device list, and assertion helpers.

Import what you need in a test module::

    from tests.helpers import DEVICES, DTYPE_CASES, DtypeCase, assert_close, grads, roundtrip_module

and use the ``device`` / ``dtype_case`` / ``reduction`` fixtures of ``tests/conftest.py``
(parametrised over :data:`DEVICES`, :data:`DTYPE_CASES` and :data:`REDUCTIONS`) to get the
reduction x device x dtype matrix of every loss; ``one_thread`` runs a test on one torch thread.

How tolerances are meant (see :class:`DtypeCase`):

- ``value``: the loss computed from inputs in ``dtype`` against a float64 reference computed
  on the *same* (already rounded) input values. The contract computes in float32 whatever the
  input precision, so this is float32-tight for bfloat16/float16 too: a loss that silently
  computes in half precision fails it.
- ``rounding``: the loss from inputs rounded to ``dtype`` against the float64 reference on the
  *unrounded* values, i.e. what rounding the inputs alone may cost (what a user sees).
- ``grad``: gradients, which come back in the input's dtype.

The method tests' helpers (:func:`leaf`, :func:`assert_matches_reference`, ...) are float64
references' companions; :func:`single_thread` is the generator behind the ``one_thread`` fixture
(and the benchmarks', which conftest.py does not reach).
"""

from __future__ import annotations

import copy
import io
import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

__all__ = [
    "ATOL",
    "COMPILE_BACKEND",
    "DEVICES",
    "DEVICE_PARAMS",
    "DTYPE_CASES",
    "F64",
    "FLOAT_DTYPES",
    "LOW_PRECISION",
    "REDUCTIONS",
    "DtypeCase",
    "Tol",
    "assert_close",
    "assert_compiled_matches_eager",
    "assert_finite_with_grad",
    "assert_matches_reference",
    "assert_state_dict_roundtrip",
    "assert_teacher_detached",
    "compile_fullgraph",
    "dtype_case_for",
    "grads",
    "leaf",
    "make_tensor",
    "requires_cuda",
    "roundtrip_module",
    "seeds",
    "single_thread",
]

REDUCTIONS: tuple[str, ...] = ("none", "mean", "batchmean", "sum")
"""Every value of :data:`kdloss.Reduction`, in a fixed order for parametrisation."""

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
"""Skip marker for tests that need a GPU (also mark them ``gpu``)."""

DEVICES: list[str] = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
"""The devices this machine can run on: always ``cpu``, plus ``cuda`` when one is visible."""

DEVICE_PARAMS = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, requires_cuda]),
]


@dataclass(frozen=True)
class Tol:
    """An absolute and a relative tolerance, as in :func:`torch.testing.assert_close`."""

    atol: float
    rtol: float


@dataclass(frozen=True)
class DtypeCase:
    """One input dtype of the matrix and what it may cost (see the module docstring)."""

    dtype: torch.dtype
    value: Tol
    rounding: Tol
    grad: Tol

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def low_precision(self) -> bool:
        return self.dtype in LOW_PRECISION


LOW_PRECISION: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16)
FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float64, torch.float32, torch.bfloat16, torch.float16)

DTYPE_CASES: tuple[DtypeCase, ...] = (
    DtypeCase(torch.float64, value=Tol(1e-10, 1e-8), rounding=Tol(1e-10, 1e-8), grad=Tol(1e-10, 1e-8)),
    DtypeCase(torch.float32, value=Tol(1e-5, 1e-5), rounding=Tol(1e-5, 1e-5), grad=Tol(1e-6, 1e-5)),
    # Inputs rounded to 8 (bf16) or 11 (fp16) mantissa bits; compute stays in float32, so `value`
    # is float32-tight. Gradients come back rounded to the input dtype.
    DtypeCase(torch.bfloat16, value=Tol(1e-5, 1e-5), rounding=Tol(5e-2, 5e-2), grad=Tol(1e-5, 1.6e-2)),
    DtypeCase(torch.float16, value=Tol(1e-5, 1e-5), rounding=Tol(5e-3, 5e-3), grad=Tol(1e-5, 2e-3)),
)
"""The dtype/tolerance table shared by every loss test."""


def dtype_case_for(dtype: torch.dtype) -> DtypeCase:
    """The :class:`DtypeCase` of ``dtype``."""
    for case in DTYPE_CASES:
        if case.dtype == dtype:
            return case
    raise KeyError(f"no tolerance entry for {dtype}")


def make_tensor(
    *shape: int,
    seed: int = 0,
    scale: float = 1.0,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
    requires_grad: bool = False,
) -> Tensor:
    """A reproducible ``scale * N(0, 1)`` tensor (drawn in float64 on the CPU, then cast and moved)."""
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype=dtype, device=device)
    return t.requires_grad_(requires_grad)


def assert_close(actual: Tensor, expected: Tensor, tol: Tol, *, msg: str = "") -> None:
    """``torch.testing.assert_close`` with a :class:`Tol`, comparing values in float64 on the CPU."""
    torch.testing.assert_close(
        actual.detach().to("cpu", torch.float64),
        expected.detach().to("cpu", torch.float64),
        atol=tol.atol,
        rtol=tol.rtol,
        msg=(lambda m: f"{msg}\n{m}") if msg else None,
    )


def grads(fn: Callable[..., Tensor], *inputs: Tensor) -> tuple[Tensor, ...]:
    """Gradients of ``fn(*inputs).sum()`` with respect to each input (fresh leaves, no side effects).

    Returns zeros for an input the output does not depend on (``allow_unused``).
    """
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*leaves).sum()
    got = torch.autograd.grad(out, leaves, allow_unused=True)
    return tuple(torch.zeros_like(x) if g is None else g for x, g in zip(leaves, got))


def roundtrip_module(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(how, copy)`` for each way a whole loss module must survive being copied or saved:
    ``pickle``, ``copy.deepcopy`` and ``torch.save`` / ``torch.load`` of the module object."""
    yield "pickle", pickle.loads(pickle.dumps(module))
    yield "deepcopy", copy.deepcopy(module)
    buf = io.BytesIO()
    torch.save(module, buf)
    buf.seek(0)
    yield "torch.save", torch.load(buf, weights_only=False)


def assert_state_dict_roundtrip(module: nn.Module, fresh: nn.Module) -> None:
    """Save ``module.state_dict()`` with ``torch.save``, load it (``weights_only=True``) strictly into
    ``fresh`` (a newly built module of the same class), and check both hold the same tensors."""
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    result = fresh.load_state_dict(state, strict=True)
    assert not result.missing_keys
    assert not result.unexpected_keys
    ours, theirs = module.state_dict(), fresh.state_dict()
    assert ours.keys() == theirs.keys()
    for key, value in ours.items():
        assert torch.equal(value, theirs[key]), key


COMPILE_BACKEND: str = os.environ.get("KDLOSS_TEST_COMPILE_BACKEND", "")
"""Overrides the backend of every :func:`compile_fullgraph` call when set (e.g. ``inductor``)."""


def compile_fullgraph(
    fn: Callable[..., object], *, backend: str = "inductor", dynamic: bool | None = None
) -> Callable[..., object]:
    """``torch.compile(fn, fullgraph=True, backend=backend)`` after resetting dynamo.

    ``fullgraph=True`` makes any graph break an error whatever the backend. ``dynamic=True`` traces
    sizes and Python floats (a temperature) symbolically from the first call: what a training loop
    gets after its first recompilation (a smaller last batch, a temperature schedule). ``inductor`` also
    generates and compiles C++ (CPU) or Triton (GPU) kernels: on a cold cache the first such compile
    in a process costs 15-20 s of CPU (toolchain setup), later ones 3-5 s per forward+backward
    graph; mark those tests ``slow``. ``backend="aot_eager"`` (dynamo + AOTAutograd, the backward
    traced, no code generation) costs about 1 s. ``KDLOSS_TEST_COMPILE_BACKEND`` overrides the
    choice for every call.
    """
    torch._dynamo.reset()
    # Compile in this process: a pool of compile workers costs more (each imports torch) than the
    # one or two kernels a loss needs.
    torch._inductor.config.compile_threads = 1
    return torch.compile(fn, fullgraph=True, backend=COMPILE_BACKEND or backend, dynamic=dynamic)  # type: ignore[no-any-return]


def assert_compiled_matches_eager(
    fn: Callable[..., Tensor],
    calls: Sequence[tuple[object, ...]],
    tol: Tol,
    *,
    backend: str = "inductor",
    dynamic: bool | None = True,
) -> Callable[..., object]:
    """Compile ``fn`` once (:func:`compile_fullgraph`) and check it against eager on each call.

    For every ``args`` in ``calls`` (vary the batch size and the float hyper-parameters there, to
    exercise the dynamic graph), the outputs and the gradient of ``out.sum()`` with respect to
    ``args[0]`` (a floating-point tensor) must agree within ``tol``. Returns the compiled function.
    """
    compiled = compile_fullgraph(fn, backend=backend, dynamic=dynamic)
    for args in calls:
        first = args[0]
        assert isinstance(first, Tensor)
        x_eager, x_comp = first.detach().clone().requires_grad_(True), first.detach().clone().requires_grad_(True)
        eager = fn(x_eager, *args[1:])
        got = compiled(x_comp, *args[1:])
        assert isinstance(got, Tensor)
        assert_close(got, eager, tol, msg=f"compiled value, call with shape {tuple(first.shape)}")
        (g_eager,) = torch.autograd.grad(eager.sum(), x_eager)
        (g_comp,) = torch.autograd.grad(got.sum(), x_comp)
        assert_close(g_comp, g_eager, tol, msg=f"compiled gradient, call with shape {tuple(first.shape)}")
    return compiled


def seeds(n: int, start: int = 0) -> Sequence[int]:
    """``n`` seeds for parametrised tests."""
    return range(start, start + n)


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
