"""pytest-benchmark suite: kdloss vs the naive baselines vs torch.compile of them, per loss family.

On a GPU: ``pytest benchmarks/ --benchmark-enable --benchmark-only`` (see benchmarks/README.md).
On CPU in CI, with the default ``--benchmark-disable``, every benchmark runs once as a test at tiny
sizes, and each case first checks that kdloss and the naive baseline agree.
"""

from __future__ import annotations

import os

import pytest
import torch

from benchmarks.cases import Case, cases_for, implementation, reference_check, step

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


def test_results_markdown_lists_everything() -> None:
    """run_gpu.py's table: one row per record, the speed-up against naive, and the families not covered."""
    from benchmarks.run_gpu import markdown

    meta = {
        "tag": "t",
        "command": "cmd",
        "date": "d",
        "commit": "c",
        "loadavg": "0",
        "device_name": "dev",
        "cpu": "cpu",
        "python": "3",
        "torch": "2",
        "triton": "3",
        "cuda": "12",
        "bandwidth_GBps": 3000.0,
        "warmup": 1,
        "reps": 2,
        "rotate_mib": 100,
        "max_sets": 10,
        "pending": {"fam": "not covered yet"},
    }
    base = {
        "case": "kd-x-float32",
        "family": "kd",
        "size": "cifar",
        "dtype": "float32",
        "shape": "2x3",
        "mode": "fwd",
        "bytes": 48,
        "pct_of_floor": 1.0,
    }
    records = [
        {**base, "impl": "naive", "median_s": 2e-3, "peak_extra_bytes": None, "device_ops": None, "host_sync": None},
        {**base, "impl": "kdloss", "median_s": 1e-3, "peak_extra_bytes": 2**20, "device_ops": 1, "host_sync": False},
    ]
    text = markdown(meta, records)
    assert "| kd-x-float32 | 2x3 | fwd | kdloss | 1.000 ms | 1.0 | 2.00 | 1.0 MiB | 1 | no |" in text
    assert "| kd-x-float32 | 2x3 | fwd | naive | 2.000 ms | 1.0 | 1.00 | - | - | - |" in text
    assert "- fam: not covered yet" in text
    # the summary: x textbook per loss and size, and its geometric mean and lowest value
    assert "| kd | cifar (2x3, float32) | fwd | 1.000 ms | 2.000 ms | 2.00 |" in text
    assert "Geometric mean of `x textbook` over the 1 rows: **2.00**; lowest: **2.00** (kd-x-float32, fwd)" in text


def test_check_targets_reads_a_results_file() -> None:
    """check_targets.py passes a row that meets a target, fails one that misses, flags missing rows."""
    from benchmarks.check_targets import checks

    def row(case: str, impl: str, mode: str, median: float, **kw: object) -> dict[str, object]:
        return {"case": case, "impl": impl, "mode": mode, "median_s": median, "pct_of_floor": 60.0, **kw}

    lm = "kd-lm32k-bfloat16"
    rows = [
        row(lm, "kdloss", "fwdbwd", 1e-3, peak_extra_bytes=8192 * 32000 * 2),
        row(lm, "naive", "fwdbwd", 13e-3),
        row(lm, "compiled", "fwdbwd", 1.5e-3),
        row("kd-cifar100-float32", "kdloss", "fwd", 5e-6, device_ops=1, host_sync=False),
        row("kd-cifar100-float32", "kdloss", "fwdbwd", 25e-6, device_ops=4, host_sync=False),
    ]
    got = {desc: ok for desc, ok, _ in checks({"results": rows})}
    assert got[f"{lm} >= 50% of floor"] is True
    assert got[f"{lm} >= 12x naive"] is True
    assert got[f"{lm} >= 2x compiled"] is False
    assert got[f"{lm} extra memory <= 1.05x gradient"] is True
    assert got["kd-cifar100-float32 forward: one launch"] is True
    assert got["kd-cifar100-float32 fwd+bwd <= 20 us"] is False
    assert got["kd-lm128k-bfloat16 fwd+bwd"] is None
    assert got["kd-imagenet-float32 fwd+bwd <= 30 us"] is None
