"""The GPU check's ``fused_linear`` step: its manifest rows, targets and table (no torch import here).

The step (``benchmarks/gpu_check.py``) runs ``benchmarks/bench_fused_linear.py`` twice: on the GPU
(``fused_linear.json``: lm32k float32 and lm128k bfloat16, beside Liger-Kernel when it is installed)
and on the host's CPU (``fused_linear_cpu.json``: lm32k float32, fused and naive). Targets:

- GPU, lm128k (8192 x 128,256 x 4,096 bf16): the fused loss's peak extra memory <= Liger-Kernel's
  and its forward+backward time <= 0.8x Liger-Kernel's (the better of its chunked and its Triton
  fused linear JSD, each at beta = 0: the forward KL);
- CPU, lm32k (4096 x 32,000 x 1,024 fp32): peak memory <= 1/8 of the naive formulation's, and
  time <= the naive formulation's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

GPU_CASE = "lm128k-bfloat16"
CPU_CASE = "lm32k-float32"
LIGER_IMPLS = ("liger", "liger_ops")
FILES = {"cuda": "fused_linear.json", "cpu": "fused_linear_cpu.json"}


def rows(res: Path) -> list[dict[str, Any]]:
    """The manifest's ``fused_linear`` rows: one per (device, case, implementation) measured."""
    out: list[dict[str, Any]] = []
    for default, name in FILES.items():
        try:
            doc = json.loads((res / name).read_text())
        except (OSError, ValueError):
            continue
        device = str(doc.get("meta", {}).get("device_type", default))  # a rehearsal runs both on the CPU
        for r in doc.get("rows", []):
            out.append(
                {
                    "device": device,
                    "case": r["case"],
                    "shape": r["shape"],
                    "impl": r["impl"],
                    "median_s": r["median_s"],
                    "peak_bytes": int(r["peak_bytes"]),
                    "note": "",
                }
            )
        for s in doc.get("skipped", []):  # not measured: the reason is the note
            case = s.get("case", "all sizes")
            note = str(s["reason"])[:300]
            out.append(
                {
                    "device": device,
                    "case": case,
                    "shape": "-",
                    "impl": s["impl"],
                    "median_s": None,
                    "peak_bytes": None,
                    "note": note,
                }
            )
    return out


def _find(rs: list[dict[str, Any]], device: str, case: str, impl: str) -> dict[str, Any] | None:
    for r in rs:
        if (r["device"], r["case"], r["impl"]) == (device, case, impl) and r["median_s"] is not None:
            return r
    return None


def _mib(b: int) -> str:
    return f"{b / 2**20:,.0f} MiB"


def targets(rs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``{"target", "value", "passed"}`` per target; ``passed`` None when a row it needs was not measured."""
    out: list[dict[str, Any]] = []

    def add(desc: str, value: str, passed: bool | None) -> None:
        out.append({"target": desc, "value": value, "passed": passed})

    fused = _find(rs, "cuda", GPU_CASE, "fused")
    liger = [r for r in (_find(rs, "cuda", GPU_CASE, i) for i in LIGER_IMPLS) if r is not None]
    desc_mem = f"fused linear KD {GPU_CASE}: peak extra <= Liger-Kernel's"
    desc_time = f"fused linear KD {GPU_CASE}: time <= 0.8x Liger-Kernel's"
    if fused is None or not liger:
        why = "-" if fused is None else "Liger-Kernel not measured"
        add(desc_mem, why, None)
        add(desc_time, why, None)
    else:
        best_mem = min(liger, key=lambda r: r["peak_bytes"])
        best_time = min(liger, key=lambda r: r["median_s"])
        add(
            desc_mem,
            f"{_mib(fused['peak_bytes'])} vs {_mib(best_mem['peak_bytes'])} ({best_mem['impl']})",
            fused["peak_bytes"] <= best_mem["peak_bytes"],
        )
        ratio = fused["median_s"] / best_time["median_s"]
        add(desc_time, f"{ratio:.2f}x of {best_time['impl']} ({fused['median_s'] * 1e3:.1f} ms)", ratio <= 0.8)
    f_cpu, n_cpu = _find(rs, "cpu", CPU_CASE, "fused"), _find(rs, "cpu", CPU_CASE, "naive")
    desc_cmem = f"fused linear KD {CPU_CASE} (CPU): peak <= 1/8 of naive"
    desc_ctime = f"fused linear KD {CPU_CASE} (CPU): time <= naive"
    if f_cpu is None or n_cpu is None:
        add(desc_cmem, "-", None)
        add(desc_ctime, "-", None)
    else:
        ratio = n_cpu["peak_bytes"] / max(f_cpu["peak_bytes"], 1)
        add(desc_cmem, f"1/{ratio:.1f} ({_mib(f_cpu['peak_bytes'])} vs {_mib(n_cpu['peak_bytes'])})", ratio >= 8.0)
        t = f_cpu["median_s"] / n_cpu["median_s"]
        add(desc_ctime, f"{t:.2f}x of naive ({f_cpu['median_s']:.2f} s vs {n_cpu['median_s']:.2f} s)", t <= 1.0)
    return out


def markdown(rs: list[dict[str, Any]]) -> list[str]:
    """The manifest table's lines."""
    lines = [
        "## Fused linear + KD (N x V x H; forward+backward, forward KL)",
        "",
        "| device | case | N x V x H | impl | median | peak extra | x naive time | / naive peak |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rs:
        if r["median_s"] is None:
            note = r["note"][:120].replace("|", "\\|")
            lines.append(f"| {r['device']} | {r['case']} | - | {r['impl']} | not measured: {note} | | | |")
            continue
        base = _find(rs, r["device"], r["case"], "naive")
        speed = f"{base['median_s'] / r['median_s']:.2f}x" if base else "-"
        mem = f"1/{base['peak_bytes'] / r['peak_bytes']:.1f}" if base and r["peak_bytes"] else "-"
        t = r["median_s"]
        shown = f"{t * 1e3:.1f} ms" if t < 10 else f"{t:.1f} s"
        lines.append(
            f"| {r['device']} | {r['case']} | {r['shape']} | {r['impl']} | {shown} | {_mib(r['peak_bytes'])} "
            f"| {speed} | {mem} |"
        )
    return lines
