"""Check a results JSON from run_gpu.py against the targets of the fused soft-KL kernel.

    PYTHONPATH=. python -m benchmarks.check_targets docs/benchmarks/results-h100.json

Targets, for the ``kd`` and ``kd_ce`` families, kdloss rows:

- 8192x32000 and 4096x128256 bf16, forward+backward: >= 50% of the 3-pass bandwidth floor,
  >= 12x the naive formulation, >= 2x torch.compile of it, peak extra memory <= 1.05x the gradient;
- 256x100 fp32: forward in one device operation, no host synchronisation, forward+backward <= 20 us
  ("one launch" is read as the forward's launch count: the backward is a separate
  autograd call);
- 4096x1000 (fp32 and bf16): forward+backward <= 30 us.

Prints one line per check and exits 1 if any fails (or if a needed row is missing).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _row(rows: list[dict[str, Any]], case: str, impl: str, mode: str) -> dict[str, Any] | None:
    for r in rows:
        if (r["case"], r["impl"], r["mode"]) == (case, impl, mode):
            return r
    return None


def checks(results: dict[str, Any]) -> list[tuple[str, bool | None, str]]:
    """``(description, passed or None when the row is missing, detail)`` for every target."""
    rows = results["results"]
    out: list[tuple[str, bool | None, str]] = []

    def add(desc: str, ok: bool | None, detail: str) -> None:
        out.append((desc, ok, detail))

    for fam in ("kd", "kd_ce"):
        for case, n, c in ((f"{fam}-lm32k-bfloat16", 8192, 32000), (f"{fam}-lm128k-bfloat16", 4096, 128256)):
            k = _row(rows, case, "kdloss", "fwdbwd")
            nv = _row(rows, case, "naive", "fwdbwd")
            cp = _row(rows, case, "compiled", "fwdbwd")
            if k is None:
                add(f"{case} fwd+bwd", None, "no kdloss row")
                continue
            add(f"{case} >= 50% of floor", k["pct_of_floor"] >= 50.0, f"{k['pct_of_floor']:.1f}%")
            if nv is not None:
                ratio = nv["median_s"] / k["median_s"]
                add(f"{case} >= 12x naive", ratio >= 12.0, f"{ratio:.2f}x")
            else:
                add(f"{case} >= 12x naive", None, "no naive row")
            if cp is not None:
                ratio = cp["median_s"] / k["median_s"]
                add(f"{case} >= 2x compiled", ratio >= 2.0, f"{ratio:.2f}x")
            else:
                add(f"{case} >= 2x compiled", None, "no compiled row")
            grad_bytes = n * c * 2
            extra = k.get("peak_extra_bytes")
            if extra is None:
                add(f"{case} extra memory <= 1.05x gradient", None, "not measured")
            else:
                add(f"{case} extra memory <= 1.05x gradient", extra <= 1.05 * grad_bytes, f"{extra / grad_bytes:.3f}x")
        small = f"{fam}-cifar100-float32"
        fwd, both = _row(rows, small, "kdloss", "fwd"), _row(rows, small, "kdloss", "fwdbwd")
        if fwd is None or both is None:
            add(f"{small}", None, "missing rows")
        else:
            ops = fwd.get("device_ops")
            add(f"{small} forward: one launch", None if ops is None else ops == 1, f"{ops} device ops")
            sync = both.get("host_sync")
            add(f"{small} no host sync", None if sync is None else not sync, f"host_sync={sync}")
            add(f"{small} fwd+bwd <= 20 us", both["median_s"] <= 20e-6, f"{both['median_s'] * 1e6:.1f} us")
        for dtype in ("float32", "bfloat16"):
            case = f"{fam}-imagenet-{dtype}"
            r = _row(rows, case, "kdloss", "fwdbwd")
            if r is None:
                add(f"{case} fwd+bwd <= 30 us", None, "no row")
            else:
                add(f"{case} fwd+bwd <= 30 us", r["median_s"] <= 30e-6, f"{r['median_s'] * 1e6:.1f} us")
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__)
        return 2
    results = json.loads(Path(args[0]).read_text())
    failed = False
    for desc, ok, detail in checks(results):
        status = "MISSING" if ok is None else ("PASS" if ok else "FAIL")
        failed |= ok is not True
        print(f"{status:8s} {desc:55s} {detail}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
