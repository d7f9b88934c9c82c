"""CRD step throughput: kdloss (device sampling, no (B, K+1, d) gather) against the reference style.

One full step = sampling, both embedding heads, scoring both views, NCE loss, backward, bank update.
The baseline (``tests/naive/contrastive.py``, reference-implementation style) gathers the ``(B, K+1, d)``
rows and uses ``bmm``; it is timed with negatives already on the device ("naive") and with the
reference's per-sample CPU sampling ("naive+cpu sampling").

In CI (CPU) the small sizes run once each (pytest-benchmark is disabled there); the GPU sizes
(the targets of docs/crd.md) are skipped without CUDA. The table for the docs comes from the script form::

    PYTHONPATH=. python benchmarks/test_bench_crd.py --device cpu --threads 1 --batch 64 --k 4096
    PYTHONPATH=. python benchmarks/test_bench_crd.py --device cuda --batch 64 256      # the H100 targets
    PYTHONPATH=. python benchmarks/test_bench_crd.py --device cpu --threads 1 --scoring --reps 3  # auto's rule
    PYTHONPATH=. python benchmarks/test_bench_crd.py --device cpu --threads 1 --bank-copy-ab  # in place vs copy
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from kdloss import ContrastMemory, CRDLoss
from tests.naive.contrastive import NaiveCRD, cpu_sample_negatives


@dataclass(frozen=True)
class Size:
    batch: int
    k: int
    feat_dim: int
    n_data: int
    in_dim: int  # flattened student / teacher feature width


CPU_SIZE = Size(batch=16, k=512, feat_dim=32, n_data=4096, in_dim=64)
GPU_SIZES = [Size(64, 16384, 128, 50_000, 256), Size(256, 16384, 128, 50_000, 256)]


class Bench:
    """Models, inputs and the three step functions for one size on one device."""

    def __init__(self, size: Size, device: str, *, seed: int = 0, **crd_kw: object) -> None:
        self.size, self.device = size, device
        torch.manual_seed(seed)
        self.crd = CRDLoss(
            size.in_dim, size.in_dim, size.n_data, feat_dim=size.feat_dim, n_negatives=size.k, validate=False, **crd_kw
        ).to(device)  # type: ignore[arg-type]
        self.naive = NaiveCRD(size.in_dim, size.in_dim, size.n_data, size.feat_dim, size.k, update="index_copy")
        self.naive.to(device)
        g = torch.Generator().manual_seed(seed + 1)
        self.fs = torch.randn(size.batch, size.in_dim, generator=g).to(device).requires_grad_()
        self.ft = torch.randn(size.batch, size.in_dim, generator=g).to(device)
        self.idx = torch.randperm(size.n_data, generator=g)[: size.batch].to(device)
        self.neg = torch.randint(0, size.n_data, (size.batch, size.k), generator=g).to(device)
        self.rng = np.random.default_rng(seed)

    def kdloss(self) -> torch.Tensor:
        loss = self.crd(self.fs, self.ft, self.idx)
        loss.backward()
        return loss

    def naive_step(self) -> torch.Tensor:
        loss = self.naive(self.fs, self.ft, self.idx, self.neg)
        loss.backward()
        return loss

    def naive_cpu_sampling(self) -> torch.Tensor:
        neg = cpu_sample_negatives(self.idx.cpu(), None, self.size.n_data, self.size.k, self.rng).to(self.device)
        loss = self.naive(self.fs, self.ft, self.idx, neg)
        loss.backward()
        return loss


class StackedCopyMemory(ContrastMemory):
    """Baseline for ``--bank-copy-ab``: the cost of kdloss <= 0.1's step, which stacked (copied) both banks.

    It scored against ``torch.stack([bank_teacher, bank_student])`` so that the immediate in-place
    update could not touch what autograd saved. Here the same copy is made on every call before
    the current scoring, so the two columns differ by exactly that copy.
    """

    def _score(self, *args: object) -> tuple[torch.Tensor, torch.Tensor]:
        self.flush()
        self._stacked = torch.stack([self._bank("bank_teacher"), self._bank("bank_student")])
        return super()._score(*args)  # type: ignore[arg-type]


def time_ms(fn: Callable[[], object], device: str, *, warmup: int = 3, reps: int = 20) -> float:
    """Median wall time of ``fn`` in ms (CUDA events and synchronisation on CUDA)."""
    for _ in range(warmup):
        fn()
    times = []
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


IMPLS = ["kdloss", "naive_step", "naive_cpu_sampling"]


@pytest.mark.parametrize("impl", IMPLS)
def test_bench_crd_step_cpu(benchmark: pytest.FixtureRequest, impl: str) -> None:
    b = Bench(CPU_SIZE, "cpu")
    loss = benchmark(getattr(b, impl))  # type: ignore[operator]
    assert torch.isfinite(loss).all()


def test_bench_baseline_does_the_same_work() -> None:
    """With the same negatives, the benchmarked kdloss step and the baseline give the same loss and banks."""
    b = Bench(CPU_SIZE, "cpu")
    with torch.no_grad():
        b.crd.embed_student.linear.load_state_dict(b.naive.embed_s.linear.state_dict())
        b.crd.embed_teacher.linear.load_state_dict(b.naive.embed_t.linear.state_dict())
        b.crd.memory.bank_student.copy_(b.naive.memory_v1)
        b.crd.memory.bank_teacher.copy_(b.naive.memory_v2)
    ours = b.crd(b.fs, b.ft, b.idx, negatives=b.neg)
    torch.testing.assert_close(ours, b.naive_step(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(b.crd.memory.bank_student, b.naive.memory_v1, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("size", GPU_SIZES, ids=lambda s: f"B{s.batch}")
@pytest.mark.parametrize("impl", IMPLS[:2])
def test_bench_crd_step_gpu(benchmark: pytest.FixtureRequest, size: Size, impl: str) -> None:
    b = Bench(size, "cuda")
    step = getattr(b, impl)

    def synced() -> torch.Tensor:
        out: torch.Tensor = step()
        torch.cuda.synchronize()
        return out

    loss = benchmark(synced)  # type: ignore[operator]
    assert torch.isfinite(loss).all()


def _scoring_step(v: torch.Tensor, bank: torch.Tensor, idx: torch.Tensor, method: str) -> Callable[[], None]:
    from kdloss.functional import crd_logits

    def step() -> None:
        crd_logits(v, bank, idx, method=method, validate=False).sum().backward()  # type: ignore[arg-type]

    return step


def scoring_table(device: str, reps: int) -> None:
    """The matmul-vs-gather crossover of ``crd_logits`` (forward + backward) that sets ``method="auto"``."""
    print("| B | K | B(K+1)/n | matmul ms | gather ms |")
    print("|---|---|---|---|---|")
    n, d = 50_000, 128
    bank = torch.nn.functional.normalize(torch.randn(n, d, device=device), dim=1)
    for b, k in [(64, 16384), (64, 4096), (64, 1024), (64, 256), (16, 64)]:
        v = torch.randn(b, d, device=device, requires_grad=True)
        idx = torch.randint(0, n, (b, k + 1), device=device)
        ms = {m: time_ms(_scoring_step(v, bank, idx, m), device, reps=reps) for m in ("matmul", "gather")}
        print(f"| {b} | {k} | {b * (k + 1) / n:.2f} | {ms['matmul']:.2f} | {ms['gather']:.2f} |")


def bank_copy_table(a: argparse.Namespace) -> None:
    """One CRD step (forward + backward + update) with the banks scored in place vs a stacked copy, interleaved."""
    print(f"# CRD step, banks in place vs stacked copy, device={a.device}, torch {torch.__version__}")
    print("| B | K | d | n_data | bank | in place ms | stacked copy ms | copy / in place |")
    print("|---|---|---|---|---|---|---|---|")
    for batch in a.batch:
        size = Size(batch, a.k, a.feat_dim, a.n_data, a.in_dim)
        for dtype in (torch.float32, torch.bfloat16):
            ours = Bench(size, a.device, bank_dtype=dtype)
            base = Bench(size, a.device, bank_dtype=dtype)
            mem = base.crd.memory
            copy_mem = StackedCopyMemory(size.n_data, size.feat_dim, n_negatives=size.k, dtype=dtype, validate=False)
            copy_mem.load_state_dict(mem.state_dict())
            base.crd.memory = copy_mem.to(a.device)
            t_ours, t_base = [], []
            for _ in range(3):  # interleaved rounds: drift hits both columns alike
                t_ours.append(time_ms(ours.kdloss, a.device, reps=a.reps))
                t_base.append(time_ms(base.kdloss, a.device, reps=a.reps))
            o, c = statistics.median(t_ours), statistics.median(t_base)
            sizes = f"| {batch} | {a.k} | {a.feat_dim} | {a.n_data} | {str(dtype)[6:]} |"
            print(f"{sizes} {o:.3f} | {c:.3f} | {c / o:.2f}x |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    p.add_argument("--k", type=int, default=16384)
    p.add_argument("--feat-dim", type=int, default=128)
    p.add_argument("--n-data", type=int, default=50_000)
    p.add_argument("--in-dim", type=int, default=256)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds of every column (median)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (CPU); 0 keeps the default")
    p.add_argument("--variants", action="store_true", help="also time method/bank dtype/class sampling variants")
    p.add_argument("--json", default="", help="write the results to this JSON file")
    p.add_argument("--scoring", action="store_true", help="only the matmul-vs-gather table of crd_logits")
    p.add_argument("--bank-copy-ab", action="store_true", help="only: banks scored in place vs a stacked copy")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.scoring:
        scoring_table(a.device, a.reps)
        return
    if a.bank_copy_ab:
        bank_copy_table(a)
        return
    hw = torch.cuda.get_device_name() if a.device.startswith("cuda") else platform.processor() or platform.machine()
    print(f"# CRD step, device={a.device} ({hw}), torch {torch.__version__}, threads={torch.get_num_threads()}")
    print("| B | K | d | n_data | variant | kdloss ms | naive ms | naive+cpu sampling ms | naive / kdloss |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    labels = torch.arange(a.n_data) % 100
    variants: list[tuple[str, dict[str, object]]] = [("default", {})]
    if a.variants:
        variants += [
            ("method=gather", {"method": "gather"}),
            ("bank bf16", {"bank_dtype": torch.bfloat16}),
            ("class, replacement", {"negatives": "class", "labels": labels, "replacement": True}),
            ("class, exact", {"negatives": "class", "labels": labels}),
        ]
    for batch in a.batch:
        size = Size(batch, a.k, a.feat_dim, a.n_data, a.in_dim)
        base = Bench(size, a.device)
        ours = {name: Bench(size, a.device, **kw) for name, kw in variants}
        t_naive: list[float] = []
        t_ours: dict[str, list[float]] = {name: [] for name in ours}
        for _ in range(a.rounds):  # interleaved rounds: drift hits every column alike
            t_naive.append(time_ms(base.naive_step, a.device, reps=a.reps))
            for name, bench in ours.items():
                t_ours[name].append(time_ms(bench.kdloss, a.device, reps=a.reps))
        naive = statistics.median(t_naive)
        naive_cpu = time_ms(base.naive_cpu_sampling, a.device, reps=max(3, a.reps // 4))
        for name, times in t_ours.items():
            ms = statistics.median(times)
            row = {"batch": batch, "k": a.k, "feat_dim": a.feat_dim, "n_data": a.n_data, "variant": name}
            row |= {"kdloss_ms": ms, "naive_ms": naive, "naive_cpu_sampling_ms": naive_cpu, "ratio": naive / ms}
            rows.append(row)
            print(
                f"| {batch} | {a.k} | {a.feat_dim} | {a.n_data} | {name} | {ms:.3f} | {naive:.3f} | "
                f"{naive_cpu:.3f} | {naive / ms:.1f}x |"
            )
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": a.device, "hardware": hw, "torch": torch.__version__, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
