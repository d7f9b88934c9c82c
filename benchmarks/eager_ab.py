"""A/B timing, in one process, of soft_kl's eager path with its current row-validity check vs the previous one.

The previous check was ``~(x == -inf).all(-1)`` (a comparison pass and a reduction pass per
tensor); the current one is ``x.amax(-1) != -inf`` (one reduction). Both give identical results
(values and gradients are compared first). Calls alternate between the two versions so that a busy
machine slows both alike::

    PYTHONPATH=. python -m benchmarks.eager_ab
"""

from __future__ import annotations

import statistics
import time

import torch

import kdloss.functional.kl as klmod
from kdloss.functional import soft_kl

CURRENT = klmod._has_finite


def previous_has_finite(x: torch.Tensor) -> torch.Tensor:
    return ~(x.detach() == float("-inf")).all(dim=-1)


def _call(check, s: torch.Tensor, t: torch.Tensor, bwd: bool) -> tuple[float, torch.Tensor, torch.Tensor | None]:  # type: ignore[no-untyped-def]
    klmod._has_finite = check
    try:
        x = s.clone().requires_grad_(bwd)
        t0 = time.perf_counter()
        if bwd:
            loss = soft_kl(x, t, temperature=4.0)
            (g,) = torch.autograd.grad(loss, x)
        else:
            with torch.no_grad():
                loss, g = soft_kl(x, t, temperature=4.0), None
        return time.perf_counter() - t0, loss, g
    finally:
        klmod._has_finite = CURRENT


def main(reps: int = 60) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    for n, c, dtype in [(256, 100, torch.float32), (1024, 1000, torch.float32), (64, 2048, torch.bfloat16)]:
        s, t = (torch.randn(n, c) * 2).to(dtype), (torch.randn(n, c) * 2).to(dtype)
        s[0, :3] = float("-inf")
        t[1] = float("-inf")
        for bwd in (False, True):
            _, l0, g0 = _call(previous_has_finite, s, t, bwd)
            _, l1, g1 = _call(CURRENT, s, t, bwd)
            if not torch.equal(l0, l1) or (g0 is not None and g1 is not None and not torch.equal(g0, g1)):
                raise AssertionError("the two checks disagree")
            before, after = [], []
            for _ in range(reps):
                before.append(_call(previous_has_finite, s, t, bwd)[0])
                after.append(_call(CURRENT, s, t, bwd)[0])
            b, a = statistics.median(before[3:]), statistics.median(after[3:])
            mode = "fwd+bwd" if bwd else "fwd"
            name = f"{n}x{c} {str(dtype)[6:]}"
            print(f"{name:18s} {mode:7s} before {b * 1e6:9.0f} us  after {a * 1e6:9.0f} us  {b / a:.2f}x")


if __name__ == "__main__":
    main()
