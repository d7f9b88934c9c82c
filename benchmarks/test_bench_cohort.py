"""CohortLoss (one student log-softmax for all K teachers) against the loop of K separate soft_kl calls.

Forward + backward of the loss with respect to the student logits, DIH's setting (T = 5,
alpha = 0.1, K = k + 1 teachers). Baselines are the explicit loops of ``tests/naive/cohort.py``.

- ``pytest benchmarks/test_bench_cohort.py --benchmark-only --benchmark-enable``: pytest-benchmark
  tables (CPU sizes always; GPU sizes only with CUDA, where ``cohort_loss`` is the fused Triton
  kernel and ``cohort_loss_eager`` the same call with the kernels switched off):
  ``pytest benchmarks/test_bench_cohort.py -k gpu --benchmark-only --benchmark-enable``.
- ``PYTHONPATH=. python benchmarks/test_bench_cohort.py``: the side-by-side ratio in one process
  (``torch.utils.benchmark``, interleaved, median), as recorded in ``docs/cohorts.md``.

Under plain ``pytest`` (benchmarks disabled) each case runs once and checks that the two
formulations agree.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from kdloss import CohortLoss
from kdloss.kernels import set_kernels_enabled
from tests.naive.cohort import cohort_kl_div, cohort_loop

CPU_SIZES = [(4, 64, 100), (4, 128, 1000)]  # (K, B, C): resnet110 -> resnet8 (k = 3) on CIFAR-100, and 1000 classes
GPU_SIZES = [(5, 256, 1000), (5, 1024, 1000), (4, 4096, 100)]

_T, _ALPHA = 5.0, 0.1


def _inputs(k: int, b: int, c: int, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    student = torch.randn(b, c, generator=g).to(device).requires_grad_()
    teachers = torch.randn(k, b, c, generator=g).to(device)
    labels = torch.randint(0, c, (b,), generator=g).to(device)
    return student, teachers, labels


def _fused(student: torch.Tensor, teachers: torch.Tensor, labels: torch.Tensor) -> Callable[[], torch.Tensor]:
    loss = CohortLoss(temperature=_T, alpha=_ALPHA)

    def step() -> torch.Tensor:
        student.grad = None
        total = loss(student, teachers, labels).total
        total.backward()
        return total

    return step


def _loop(student: torch.Tensor, teachers: torch.Tensor, labels: torch.Tensor) -> Callable[[], torch.Tensor]:
    listed = list(teachers.unbind(0))

    def step() -> torch.Tensor:
        student.grad = None
        total = cohort_loop(student, listed, labels, _T, _ALPHA)
        total.backward()
        return total

    return step


def _kl_div(student: torch.Tensor, teachers: torch.Tensor, labels: torch.Tensor) -> Callable[[], torch.Tensor]:
    listed = list(teachers.unbind(0))

    def step() -> torch.Tensor:
        student.grad = None
        total = cohort_kl_div(student, listed, labels, _T, _ALPHA)
        total.backward()
        return total

    return step


def _eager(student: torch.Tensor, teachers: torch.Tensor, labels: torch.Tensor) -> Callable[[], torch.Tensor]:
    """CohortLoss with the fused kernels switched off: the eager path (on CUDA, the kernel's baseline)."""
    inner = _fused(student, teachers, labels)

    def step() -> torch.Tensor:
        set_kernels_enabled(False)
        try:
            return inner()
        finally:
            set_kernels_enabled(True)

    return step


_IMPLS = {"cohort_loss": _fused, "loop_soft_kl": _loop, "loop_kl_div": _kl_div}
# on CUDA, cohort_loss takes the fused Triton kernel; cohort_loss_eager is the same call without it
_GPU_IMPLS = {**_IMPLS, "cohort_loss_eager": _eager}


def _run(benchmark: object, impl: str, size: tuple[int, int, int], device: str) -> None:
    student, teachers, labels = _inputs(*size, device)
    step = _GPU_IMPLS[impl](student, teachers, labels)
    value = benchmark(step)  # type: ignore[operator]
    reference = cohort_loop(student.detach(), list(teachers), labels, _T, _ALPHA)
    torch.testing.assert_close(value.detach(), reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size", CPU_SIZES, ids=lambda s: "K{}-B{}-C{}".format(*s))
@pytest.mark.parametrize("impl", list(_IMPLS))
def test_bench_cohort_cpu(benchmark: object, impl: str, size: tuple[int, int, int]) -> None:
    _run(benchmark, impl, size, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("size", GPU_SIZES, ids=lambda s: "K{}-B{}-C{}".format(*s))
@pytest.mark.parametrize("impl", list(_GPU_IMPLS))
def test_bench_cohort_gpu(benchmark: object, impl: str, size: tuple[int, int, int]) -> None:
    """On CUDA ``cohort_loss`` is the fused Triton kernel (Triton importable), ``cohort_loss_eager`` the eager path."""
    _run(benchmark, impl, size, "cuda")


def main() -> None:
    """Print the side-by-side median times and the loop / CohortLoss ratio for every size."""
    from torch.utils import benchmark as tb

    device = "cuda" if torch.cuda.is_available() else "cpu"
    sizes = GPU_SIZES if device == "cuda" else CPU_SIZES
    print(f"torch {torch.__version__}, {device}, threads {torch.get_num_threads()}, T={_T}, alpha={_ALPHA}")
    impls = _GPU_IMPLS if device == "cuda" else _IMPLS
    eager_col = " CohortLoss eager (us) |" if device == "cuda" else ""
    loops = " loop of soft_kl (us) | loop of F.kl_div (us) | loop / CohortLoss |"
    print(f"| K, B, C | CohortLoss (us) |{eager_col}{loops}")
    print("|---|---|---|---|---|" + ("---|" if eager_col else ""))
    for size in sizes:
        student, teachers, labels = _inputs(*size, device)
        steps = {name: make(student, teachers, labels) for name, make in impls.items()}
        medians: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(5):  # interleave the three so that machine noise hits them alike
            for name, step in steps.items():
                timer = tb.Timer(stmt="step()", globals={"step": step})
                medians[name].append(timer.blocked_autorange(min_run_time=0.2).median)
        med = {name: sorted(v)[len(v) // 2] * 1e6 for name, v in medians.items()}
        print(
            f"| {size} | {med['cohort_loss']:.0f} |"
            + (f" {med['cohort_loss_eager']:.0f} |" if eager_col else "")
            + f" {med['loop_soft_kl']:.0f} | {med['loop_kl_div']:.0f} | "
            f"{med['loop_soft_kl'] / med['cohort_loss']:.2f}x |"
        )


if __name__ == "__main__":
    main()
