"""pytest-benchmark suite: kdloss vs the naive baselines vs torch.compile of them, per loss family.

On a GPU: ``pytest benchmarks/ --benchmark-enable --benchmark-only`` (see benchmarks/README.md).
On CPU in CI, with the default ``--benchmark-disable``, every benchmark runs once as a test at tiny
sizes, and each case first checks that kdloss and the naive baseline agree.
"""

from __future__ import annotations

import os

import pytest
import torch

from benchmarks.cases import PENDING_FAMILIES, Case, cases_for, implementation, reference_check, step

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = {c.id: c for c in cases_for(DEVICE)}
# Inductor's C++ compile costs ~20 s on a busy 2-core CI machine: off by default on CPU.
COMPILE_ON_CPU = os.environ.get("KDLOSS_BENCH_COMPILE", "0") == "1"
ROTATE = 4  # input sets cycled through (run_gpu.py sizes the rotation to exceed L2)


def _params() -> list[object]:
    out: list[object] = []
    for cid, case in CASES.items():
        for impl in ("kdloss", "naive", "compiled"):
            for mode in ("fwd", "fwdbwd"):
                marks = []
                one_cpu_case = COMPILE_ON_CPU and (case.family, case.size, mode) == ("kd_ce", "cifar100", "fwd")
                if impl == "compiled" and DEVICE.type == "cpu" and not one_cpu_case:
                    marks.append(pytest.mark.skip(reason="torch.compile on CPU: KDLOSS_BENCH_COMPILE=1 runs one case"))
                out.append(pytest.param(cid, impl, mode, id=f"{cid}-{impl}-{mode}", marks=marks))
    return out


_CURRENT: dict[str, list[dict[str, object]]] = {}


def _inputs(case_id: str) -> list[dict[str, object]]:
    """The rotating input sets of one case; only the current case's are kept (LM sizes are GBs)."""
    if case_id not in _CURRENT:
        _CURRENT.clear()
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()
        _CURRENT[case_id] = [CASES[case_id].make(DEVICE, seed) for seed in range(ROTATE)]
    return _CURRENT[case_id]


@pytest.mark.parametrize(("case_id", "impl", "mode"), _params())
def test_loss(benchmark, case_id: str, impl: str, mode: str) -> None:  # type: ignore[no-untyped-def]
    case: Case = CASES[case_id]
    sets = _inputs(case_id)
    reference_check(case, sets[0])
    fn = step(case, impl, implementation(case, impl), mode)
    counter = iter(range(10**9))
    sync = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)

    def run() -> object:
        out = fn(sets[next(counter) % len(sets)])
        sync()
        return out

    benchmark.group = f"{case_id}-{mode}"
    benchmark.extra_info.update(
        family=case.family, size=case.size, shape=case.shape, dtype=str(case.dtype), impl=impl, mode=mode
    )
    benchmark.extra_info["bytes"] = case.bytes_fwd if mode == "fwd" else case.bytes_fwdbwd
    out = benchmark(run)
    first = out if isinstance(out, torch.Tensor) else out[0]  # type: ignore[index]
    assert torch.isfinite(first).all()


@pytest.mark.parametrize("family", sorted(PENDING_FAMILIES))
def test_pending_family(family: str) -> None:
    """Hooks for the families that other branches are writing: they fail loudly once the API exists."""
    import kdloss.functional as kf

    api = {"crd_step": "crd_loss", "cohort": "cohort_kd_loss"}[family]
    if hasattr(kf, api):
        pytest.fail(f"kdloss.functional.{api} exists now: add the {family} cases to benchmarks/cases.py")
    pytest.skip(PENDING_FAMILIES[family])
