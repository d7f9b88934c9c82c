"""Host time per call at tiny sizes: what a loss costs before any arithmetic matters.

On a GPU, small losses (CIFAR logits, 256x100) are host-bound: the time is Python, argument
checks and operator dispatch, not the kernels. On a CPU with tiny tensors (2x3 logits) the same
holds, so the per-call time here measures that overhead directly, for kdloss and for the
textbook formulation (``tests/naive/``; DKD: ``tests/naive/reference_code.py``), forward alone
(under ``no_grad``) and forward + backward. CPU time of this process (``time.process_time``),
best of ``--repeat`` runs of ``--number`` calls: a busy machine slows the wall clock, not this.

::

    PYTHONPATH=. python -m benchmarks.host_overhead
"""

from __future__ import annotations

import argparse
import time
import timeit
from collections.abc import Callable

import torch

import kdloss.functional as KF
from benchmarks._cpu_alloc import pin_malloc
from tests import naive
from tests.naive import reference_code


def _per_call(fn: Callable[[], object], number: int, repeat: int) -> float:
    timer = timeit.Timer(fn, timer=time.process_time)
    return min(timer.repeat(number=number, repeat=repeat)) / number


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--number", type=int, default=2000)
    p.add_argument("--repeat", type=int, default=7)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    pin_malloc()  # tiny tensors: no effect expected, the same policy as the other CPU benchmarks
    s = torch.randn(2, 3, requires_grad=True)
    t = torch.randn(2, 3)
    y = torch.tensor([0, 2])
    rows: list[tuple[str, Callable[[], torch.Tensor], Callable[[], torch.Tensor]]] = [
        ("soft_kl", lambda: KF.soft_kl(s, t, temperature=4.0), lambda: naive.kd_kl_div(s, t, 4.0)),
        (
            "kd_ce_loss",
            lambda: KF.kd_ce_loss(s, t, y, alpha=0.9, temperature=4.0),
            lambda: naive.kd_ce(s, t, y, 4.0, 0.9),
        ),
        (
            "soft_kl jsd",
            lambda: KF.soft_kl(s, t, temperature=4.0, direction="jsd", jsd_weight=0.5),
            lambda: naive.jsd(s, t, 4.0, 0.5),
        ),
        (
            "soft_kl rev.",
            lambda: KF.soft_kl(s, t, temperature=4.0, direction="reverse"),
            lambda: naive.reverse_kl(s, t, 4.0),
        ),
        (
            "dkd_loss",
            lambda: KF.dkd_loss(s, t, y, alpha=1.0, beta=8.0, temperature=4.0),
            lambda: reference_code.dkd(s, t, y, 1.0, 8.0, 4.0),
        ),
    ]
    floor = _per_call(lambda: torch.autograd.grad(s.sum(), s), args.number, args.repeat)
    print(f"torch.autograd.grad(s.sum(), s) alone: {floor * 1e6:.1f} us (in every forward + backward below)")
    print(f"{'loss':14s} {'mode':9s} {'kdloss':>9s} {'textbook':>9s}  x textbook")
    for name, ours, theirs in rows:
        for mode in ("forward", "fwd+bwd"):
            if mode == "forward":

                def run(f: Callable[[], torch.Tensor]) -> Callable[[], object]:
                    def call() -> object:
                        with torch.no_grad():
                            return f()

                    return call
            else:

                def run(f: Callable[[], torch.Tensor]) -> Callable[[], object]:
                    return lambda: torch.autograd.grad(f(), s)

            a = _per_call(run(ours), args.number, args.repeat)
            b = _per_call(run(theirs), args.number, args.repeat)
            print(f"{name:14s} {mode:9s} {a * 1e6:7.1f}us {b * 1e6:7.1f}us  {b / a:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
