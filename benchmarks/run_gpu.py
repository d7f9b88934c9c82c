"""Time every benchmark case and write the results as JSON + a Markdown table under docs/benchmarks/.

GPU (the benchmark sizes of benchmarks/cases.py)::

    PYTHONPATH=. python -m benchmarks.run_gpu --tag h100

CPU (tiny sizes; what the committed CPU table was made with)::

    PYTHONPATH=. python -m benchmarks.run_gpu --device cpu --tag cpu

Method (benchmarks/README.md): copy bandwidth measured first; per case and implementation, warm-up
calls (these include torch.compile's compilation), then ``--reps`` timed calls, each on the next of
enough rotating input sets to exceed ``--rotate-mib`` (2x the H100's 50 MiB L2 by default); on CUDA
every call is bracketed by CUDA events and the median is reported; peak extra memory from
``torch.cuda.max_memory_allocated``; device operations counted with ``torch.profiler``; host
synchronisations detected with ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from benchmarks._cpu_alloc import pin_malloc
from benchmarks.bench_fused_linear import time_call
from benchmarks.cases import PENDING_FAMILIES, Case, cpu_cases, gpu_cases, implementation, reference_check, step
from kdloss.kernels import kernels_mode
from kdloss.kernels import status as kernels_status

IMPLS = ("kdloss", "naive", "compiled")
MODES = ("fwd", "fwdbwd")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device: torch.device) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + bytes written), median of 20 copies."""
    n = (1 << 28) if device.type == "cuda" else (1 << 25)  # 1 GiB / 128 MiB of float32
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = [time_call(lambda: dst.copy_(src), device) for _ in range(20)]
    return 2 * src.numel() * src.element_size() / statistics.median(times)


def _device_ops(fn: Any, device: torch.device) -> int | None:
    """Device operations (kernels, memcpy, memset) one call issues, from torch.profiler; None on CPU."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def _host_syncs(fn: Any, device: torch.device) -> bool | None:
    if device.type != "cuda":
        return None
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    except RuntimeError:
        return True
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return False


def _peak_extra(fn: Any, device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    del out
    return torch.cuda.max_memory_allocated() - base


def measure(case: Case, impl: str, mode: str, device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    first = case.make(device, 0)
    reference_check(case, first)
    per_set = case.bytes_fwdbwd
    n_sets = max(1, min(args.max_sets, math.ceil(args.rotate_mib * 2**20 / per_set)))
    sets = [first] + [case.make(device, seed) for seed in range(1, n_sets)]
    fn = step(case, impl, implementation(case, impl), mode)
    i = 0

    def call() -> Any:
        nonlocal i
        i += 1
        return fn(sets[i % n_sets])

    for _ in range(args.warmup):
        call()
    _sync(device)
    times = [time_call(call, device) for _ in range(args.reps)]
    med = statistics.median(times)
    nbytes = case.bytes_fwd if mode == "fwd" else case.bytes_fwdbwd
    rec: dict[str, Any] = {
        "case": case.id,
        "family": case.family,
        "size": case.size,
        "shape": case.shape,
        "dtype": str(case.dtype).removeprefix("torch."),
        "impl": impl,
        "mode": mode,
        "median_s": med,
        "p10_s": sorted(times)[len(times) // 10],
        "p90_s": sorted(times)[(9 * len(times)) // 10],
        "reps": args.reps,
        "warmup": args.warmup,
        "input_sets": n_sets,
        "bytes": nbytes,
        "floor_s": nbytes / args.bandwidth,
        "pct_of_floor": 100.0 * (nbytes / args.bandwidth) / med,
        "peak_extra_bytes": _peak_extra(call, device),
        "device_ops": _device_ops(call, device),
        "host_sync": _host_syncs(call, device),
    }
    return rec


def _fmt_time(s: float) -> str:
    return f"{s * 1e6:.1f} us" if s < 1e-3 else f"{s * 1e3:.3f} ms"


def _fmt_bytes(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:.1f} MiB"


def markdown(meta: dict[str, Any], records: list[dict[str, Any]]) -> str:
    lines = [
        f"# Loss benchmarks: {meta['tag']}",
        "",
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']}; git commit {meta['commit']}; host load average at start {meta['loadavg']}",
        f"- device: {meta['device_name']}; host: {meta['cpu']}",
        f"- versions: python {meta['python']}, torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}",
        f"- measured copy bandwidth: {meta['bandwidth_GBps']:.1f} GB/s (read + write); floor = bytes / bandwidth "
        "(byte counts in benchmarks/cases.py)",
        f"- warm-up {meta['warmup']} calls, median of {meta['reps']} timed calls, inputs rotated over "
        f">= {meta['rotate_mib']} MiB (at most {meta['max_sets']} sets); host memory: {meta.get('allocator', '?')}",
        "- `naive` = the textbook formulation (`tests/naive/<family>.py`); "
        "`compiled` = torch.compile of it; `x textbook` = textbook median / this median (above 1: faster)",
        "",
    ]
    naive = {(r["case"], r["mode"]): r["median_s"] for r in records if r["impl"] == "naive"}
    ours = [r for r in records if r["impl"] == "kdloss" and naive.get((r["case"], r["mode"]))]
    if ours:
        ratios = [naive[(r["case"], r["mode"])] / r["median_s"] for r in ours]
        geo = math.exp(sum(math.log(v) for v in ratios) / len(ratios))
        worst = min(zip(ratios, ours), key=lambda p: p[0])
        lines += [
            "## kdloss against the textbook formulation",
            "",
            f"Geometric mean of `x textbook` over the {len(ratios)} rows: **{geo:.2f}**; lowest: "
            f"**{worst[0]:.2f}** ({worst[1]['case']}, {worst[1]['mode']}).",
            "",
            "| loss | size | mode | kdloss | textbook | x textbook |",
            "|---|---|---|---:|---:|---:|",
        ]
        for r, ratio in zip(ours, ratios):
            size = f"{r.get('size', '')} ({r['shape']}, {r.get('dtype', '')})"
            lines.append(
                f"| {r.get('family', r['case'])} | {size} | {r['mode']} | "
                f"{_fmt_time(r['median_s'])} | {_fmt_time(naive[(r['case'], r['mode'])])} | {ratio:.2f} |"
            )
        lines += ["", "## Every entry", ""]
    lines += [
        "| case | shape | mode | impl | median | % of floor | x textbook | peak extra mem | device ops | host sync |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in records:
        base = naive.get((r["case"], r["mode"]))
        speed = f"{base / r['median_s']:.2f}" if base else "-"
        ops = "-" if r["device_ops"] is None else str(r["device_ops"])
        sync = "-" if r["host_sync"] is None else ("yes" if r["host_sync"] else "no")
        lines.append(
            f"| {r['case']} | {r['shape']} | {r['mode']} | {r['impl']} | {_fmt_time(r['median_s'])} | "
            f"{r['pct_of_floor']:.1f} | {speed} | {_fmt_bytes(r['peak_extra_bytes'])} | {ops} | {sync} |"
        )
    if meta.get("errors"):
        lines += ["", "Entries that failed (not timed):", ""]
        lines += [f"- {e['case']} {e['mode']} {e['impl']}: {e['error'][:300]}" for e in meta["errors"]]
    if meta.get("pending"):
        lines += ["", "Not benchmarked yet (written on other branches):", ""]
        lines += [f"- {k}: {v}" for k, v in meta["pending"].items()]
    return "\n".join(lines) + "\n"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} logical cores)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tag", default=None, help="file name tag: docs/benchmarks/results-<tag>.{json,md}")
    p.add_argument("--out-dir", default="docs/benchmarks")
    p.add_argument("--families", default="", help="comma-separated subset (kd,kd_ce,jsd,hint,at)")
    p.add_argument("--sizes", default="", help="comma-separated subset of size names (cifar100,imagenet,lm32k,...)")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--rotate-mib", type=float, default=None, help="rotate input sets over at least this many MiB")
    p.add_argument("--max-sets", type=int, default=None)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (CPU runs)")
    p.add_argument(
        "--default-malloc",
        action="store_true",
        help="CPU runs: keep glibc's dynamic mmap/trim thresholds (default: fixed, see benchmarks/_cpu_alloc.py)",
    )
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.warmup = args.warmup if args.warmup is not None else (25 if cuda else 3)
    args.reps = args.reps if args.reps is not None else (200 if cuda else 15)
    args.rotate_mib = args.rotate_mib if args.rotate_mib is not None else (100.0 if cuda else 1.0)
    args.max_sets = args.max_sets if args.max_sets is not None else (2000 if cuda else 4)
    allocator = "CUDA caching allocator"
    if not cuda:
        torch.set_num_threads(args.threads)
        allocator = "default allocator (--default-malloc)" if args.default_malloc else pin_malloc()
    tag = args.tag or device.type
    families = {f for f in args.families.split(",") if f}
    sizes = {f for f in args.sizes.split(",") if f}
    impls = [i for i in args.impls.split(",") if i]

    args.bandwidth = copy_bandwidth(device)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "?"
    meta: dict[str, Any] = {
        "tag": tag,
        "command": "PYTHONPATH=. python -m benchmarks.run_gpu " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit,
        "loadavg": " / ".join(f"{x:.1f}" for x in os.getloadavg()) + " (1/5/15 min)",
        "device_name": torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} thread(s)",
        "cpu": _cpu_name(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda if cuda else "n/a (CPU run)",
        "bandwidth_GBps": args.bandwidth / 1e9,
        "warmup": args.warmup,
        "reps": args.reps,
        "rotate_mib": args.rotate_mib,
        "max_sets": args.max_sets,
        "allocator": allocator,
        "kernels_mode": kernels_mode(),
        "pending": PENDING_FAMILIES,
    }
    records: list[dict[str, Any]] = []
    errors: list[dict[str, str]] = []
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta["errors"] = errors

    def write() -> None:  # after every case, so that a run cut short keeps what it measured
        meta["kernels_status"] = [dataclasses.asdict(s) for s in kernels_status()]  # used, and why
        _atomic_write(out / f"results-{tag}.json", json.dumps({"meta": meta, "results": records}, indent=1) + "\n")
        _atomic_write(out / f"results-{tag}.md", markdown(meta, records))

    for case in gpu_cases() if cuda else cpu_cases():
        if (families and case.family not in families) or (sizes and case.size not in sizes):
            continue
        for mode in MODES:
            for impl in impls:
                try:
                    rec = measure(case, impl, mode, device, args)
                except Exception as exc:  # one failing entry (e.g. a compile error) must not lose the run
                    print(f"{case.id:28s} {mode:7s} {impl:9s} ERROR {type(exc).__name__}: {exc}", flush=True)
                    errors.append(
                        {"case": case.id, "impl": impl, "mode": mode, "error": f"{type(exc).__name__}: {exc}"}
                    )
                    if cuda:
                        torch.cuda.empty_cache()
                    continue
                records.append(rec)
                print(
                    f"{case.id:28s} {mode:7s} {impl:9s} {_fmt_time(rec['median_s']):>12s} "
                    f"{rec['pct_of_floor']:6.1f}% of floor",
                    flush=True,
                )
                if cuda:
                    torch.cuda.empty_cache()
        write()
    write()
    print(f"wrote {out / f'results-{tag}.json'} and {out / f'results-{tag}.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
