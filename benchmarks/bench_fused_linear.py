"""Fused linear + KD (``kdloss.functional.fused_linear_kd``) against the materialised-logits formulation.

Implementations, each timed forward+backward (the loss, then ``torch.autograd.grad`` with respect to
the student's hidden states and output weight) on the same inputs, in one process:

- ``fused``: ``fused_linear_kd(h_s, W_s, h_t, W_t, divergence="forward")`` (default chunk size);
- ``naive``: both logits materialised, ``log_softmax`` + ``F.kl_div(batchmean, log_target=True)``
  (``tests/naive/fused_linear.py``'s ``lm_kl_div``);
- ``compiled``: ``torch.compile`` of ``naive``;
- ``fused_compiled`` (only with ``--impls``): ``torch.compile`` of ``fused`` (Inductor fuses each
  chunk's elementwise work; the chunk loop is unrolled, so compiling takes longer at many chunks);
- ``liger`` (CUDA, when ``liger_kernel`` is importable): Liger-Kernel's chunked
  ``LigerFusedLinearJSDLoss`` with ``beta=0`` (its forward KL), ``weight_hard_loss=0``;
- ``liger_ops`` (CUDA, idem): Liger-Kernel's Triton ``LigerFusedLinearJSD`` with ``jsd_beta=0``.

Liger-Kernel is never a dependency: without it the two ``liger`` entries are skipped and the reason is
recorded. Every loss here is the forward KL at temperature 1 (Liger does not multiply by ``T**2``),
averaged over the tokens, so the values agree; each implementation's value is checked against
``fused``'s before it is timed.

Sizes (N tokens x V vocabulary x H hidden): ``lm32k`` 4096 x 32,000 x 1,024 float32 (CPU and CUDA);
``lm128k`` 8192 x 128,256 x 4,096 bfloat16 (CUDA). ``--sizes tiny`` (64 x 512 x 32) is the rehearsal.

Peak memory (``peak_bytes``) is the largest amount of memory the allocator held during one
forward+backward call beyond what was allocated before it (inputs excluded; the gradients and
everything temporary included): on CUDA ``torch.cuda.max_memory_allocated`` minus the allocation
before the call; on the CPU the running sum of the allocation and free events that torch's CPU
allocator reports to ``torch.profiler`` (``profile_memory=True``), in time order, measured in a
separate call from the timed ones. Times: medians of ``--reps`` calls after ``--warmup`` calls
(CUDA events on the GPU, ``time.perf_counter`` on the CPU).

Usage (from the repository root)::

    PYTHONPATH=. python benchmarks/bench_fused_linear.py --device cpu --json fused-linear-cpu.json
    PYTHONPATH=. python benchmarks/bench_fused_linear.py --device cuda --json fused-linear-cuda.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kdloss.functional import fused_linear_kd
from tests.naive.fused_linear import lm_kl_div

Inputs = dict[str, Tensor]
Loss = Callable[[Inputs], Tensor]

SIZES: dict[str, tuple[int, int, int, torch.dtype]] = {
    "tiny": (64, 512, 32, torch.float32),
    "lm32k": (4096, 32000, 1024, torch.float32),
    "lm128k": (8192, 128256, 4096, torch.bfloat16),
}
DEFAULT_SIZES = {"cpu": ("lm32k",), "cuda": ("lm32k", "lm128k")}
IMPLS = ("fused", "naive", "compiled", "liger", "liger_ops", "fused_compiled")
DEFAULT_IMPLS = IMPLS[:-1]  # fused_compiled on request: compiling the unrolled chunk loop takes a while
TEACHER_HIDDEN_RATIO = 1  # teacher hidden = student hidden (the sizes are the student's)


def make_inputs(n: int, v: int, h: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Inputs:
    """Student hidden states ``(N, H)`` and weight ``(V, H)`` (both trainable), teacher's (frozen), labels."""
    g = torch.Generator(device=device).manual_seed(seed)
    ht_dim = h * TEACHER_HIDDEN_RATIO

    def randn(*shape: int, scale: float) -> Tensor:
        return (torch.randn(*shape, device=device, generator=g) * scale).to(dtype)

    return {
        "hs": randn(n, h, scale=1.0).requires_grad_(True),
        "ws": randn(v, h, scale=h**-0.5).requires_grad_(True),
        "ht": randn(n, ht_dim, scale=1.0),
        "wt": randn(v, ht_dim, scale=ht_dim**-0.5 * 2.0),
        "y": torch.randint(0, v, (n,), device=device, generator=g),
    }


def _liger() -> tuple[dict[str, Loss], str | None]:
    """Liger-Kernel's two fused linear JSD losses at beta = 0 (forward KL), or why they are not available."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
        from liger_kernel.transformers import LigerFusedLinearJSD
    except Exception as e:  # ImportError, or an incompatible install (it imports triton)
        return {}, f"liger_kernel not importable: {type(e).__name__}: {e}"
    chunked = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0, temperature=1.0)
    ops = LigerFusedLinearJSD(jsd_beta=0.0, temperature=1.0)
    return {
        "liger": lambda x: chunked(x["hs"], x["ws"], x["ht"], x["wt"], x["y"]),
        "liger_ops": lambda x: ops(x["hs"], x["ws"], x["ht"], x["wt"]),
    }, None


def implementations(
    device: torch.device, chunk_size: int | None, wanted: list[str]
) -> tuple[dict[str, Loss], dict[str, str]]:
    """The losses to time and, for those that cannot run here, why."""
    impls: dict[str, Loss] = {
        "fused": lambda x: fused_linear_kd(x["hs"], x["ws"], x["ht"], x["wt"], chunk_size=chunk_size),
        "naive": lambda x: lm_kl_div(x["hs"], x["ws"], x["ht"], x["wt"], 1.0),
    }
    if "compiled" in wanted:  # importing dynamo alone takes seconds: only when asked for
        impls["compiled"] = torch.compile(lambda x: lm_kl_div(x["hs"], x["ws"], x["ht"], x["wt"], 1.0))
    if "fused_compiled" in wanted:
        impls["fused_compiled"] = torch.compile(
            lambda x: fused_linear_kd(x["hs"], x["ws"], x["ht"], x["wt"], chunk_size=chunk_size)
        )
    skipped: dict[str, str] = {}
    if device.type == "cuda" and {"liger", "liger_ops"} & set(wanted):
        liger, why = _liger()
        impls.update(liger)
        if why is not None:
            skipped.update({"liger": why, "liger_ops": why})
    else:
        skipped.update({k: "Liger-Kernel runs on CUDA only (Triton)" for k in ("liger", "liger_ops")})
    return impls, skipped


def fwd_bwd(fn: Loss, x: Inputs) -> tuple[Tensor, ...]:
    loss = fn(x)
    return (loss, *torch.autograd.grad(loss, [x["hs"], x["ws"]]))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call takes: CUDA events on a GPU, ``time.perf_counter`` on the CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end)) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """The CPU allocator's peak during ``fn()`` above its level at the start, from torch.profiler's memory events.

    Every allocation and free of torch's CPU allocator is reported to the profiler with its size
    (``profile_memory=True``); their running sum in time order is the memory held, its maximum the
    peak. Allocations made before the call (the inputs) are not in the sum; the output is freed
    inside the profiled region, so it counts while it lives.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]  # type: ignore[union-attr]
    events.sort(key=lambda e: e.start_ns())
    held = peak = 0
    for e in events:
        if e.device_type() != torch.autograd.DeviceType.CPU:
            continue
        held += e.nbytes()
        peak = max(peak, held)
    return peak


def cuda_peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    _sync(device)
    del out
    return int(torch.cuda.max_memory_allocated(device) - base)


def _check(name: str, value: float, reference: float | None, dtype: torch.dtype) -> None:
    if reference is None:
        return
    tol = 2e-2 if dtype != torch.float32 else 1e-3
    if abs(value - reference) > tol * max(1.0, abs(reference)):
        raise AssertionError(f"{name}: loss {value:.6f} differs from fused's {reference:.6f}")


def measure_case(
    impls: dict[str, Loss], x: Inputs, device: torch.device, reps: int, warmup: int
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Every implementation on ``x``: value (checked against ``fused``'s), then the timed calls
    interleaved (``fused naive compiled ... fused naive ...``, so a load that changes during the run
    weighs on all alike), then one call each for the peak memory."""
    out: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}
    calls: dict[str, Callable[[], object]] = {}
    reference: float | None = None
    for name, fn in impls.items():
        call = lambda fn=fn: fwd_bwd(fn, x)  # noqa: E731
        try:
            first = call()
            value = float(first[0].detach())
            del first
            _check(name, value, reference, x["hs"].dtype)
            for _ in range(warmup):
                call()
            _sync(device)
        except Exception as e:  # one failing entry (out of memory, a compile error) must not lose the run
            errors[name] = f"{type(e).__name__}: {str(e)[:300]}"
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        if name == "fused":
            reference = value
        calls[name] = call
        out[name] = {"value": value, "times_s": [], "process_times_s": []}
    for _ in range(reps):
        for name, call in calls.items():
            cpu0 = time.process_time()
            out[name]["times_s"].append(time_call(call, device))
            out[name]["process_times_s"].append(time.process_time() - cpu0)
    for name, call in calls.items():
        out[name]["median_s"] = statistics.median(out[name]["times_s"])
        out[name]["median_process_s"] = statistics.median(out[name]["process_times_s"])
        out[name]["peak_bytes"] = cuda_peak_bytes(call, device) if device.type == "cuda" else cpu_peak_bytes(call)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out, errors


def run(args: argparse.Namespace, write: Callable[[dict[str, Any]], None] = lambda doc: None) -> dict[str, Any]:
    """Measure every size; ``write`` gets the results so far after each size (a run cut short keeps them)."""
    device = torch.device(args.device)
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    sizes = [s for s in args.sizes.split(",") if s] if args.sizes else list(DEFAULT_SIZES[device.type])
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        raise SystemExit(f"--sizes: unknown size(s) {unknown}; choose from {', '.join(SIZES)}")
    wanted = [i for i in args.impls.split(",") if i]
    bad = [i for i in wanted if i not in IMPLS]
    if bad:
        raise SystemExit(f"--impls: unknown implementation(s) {bad}; choose from {', '.join(IMPLS)}")
    impls, skipped = implementations(device, args.chunk_size, wanted)
    cuda = device.type == "cuda"
    reps = args.reps if args.reps is not None else (5 if cuda else 3)
    warmup = args.warmup if args.warmup is not None else (2 if cuda else 1)
    meta: dict[str, Any] = {
        "command": "PYTHONPATH=. python benchmarks/bench_fused_linear.py " + " ".join(args.argv),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device_type": device.type,
        "device": torch.cuda.get_device_name(device) if cuda else f"CPU ({platform.processor() or platform.machine()})",
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "reps": reps,
        "warmup": warmup,
        "chunk_size": args.chunk_size,
        "loss": "forward KL, temperature 1, mean over tokens",
        "peak_bytes": "the allocator's peak during one forward+backward beyond the inputs "
        + ("(torch.cuda.max_memory_allocated)" if cuda else "(torch.profiler CPU allocator events)"),
    }
    rows: list[dict[str, Any]] = []
    skips = [{"impl": k, "reason": v} for k, v in skipped.items() if k in wanted]
    for size in sizes:
        n, v, h, dtype = SIZES[size]
        case = f"{size}-{str(dtype).removeprefix('torch.')}"
        x = make_inputs(n, v, h, dtype, device)
        chosen = {name: impls[name] for name in wanted if name in impls}
        results, errors = measure_case(chosen, x, device, reps, warmup)
        for name, err in errors.items():
            print(f"{case:22s} {name:10s} ERROR {err}", flush=True)
            skips.append({"impl": name, "case": case, "reason": err})
        for name, rec in results.items():
            dt = str(dtype).removeprefix("torch.")
            rows.append({"case": case, "shape": f"{n}x{v}x{h}", "dtype": dt, "impl": name, **rec})
            print(
                f"{case:22s} {name:10s} {rec['median_s'] * 1e3:10.1f} ms  peak {rec['peak_bytes'] / 2**20:9.1f} MiB",
                flush=True,
            )
        del x
        if cuda:
            torch.cuda.empty_cache()
        write({"meta": meta, "rows": rows, "skipped": skips})
    return {"meta": meta, "rows": rows, "skipped": skips}


def markdown(doc: dict[str, Any]) -> str:
    m = doc["meta"]
    lines = [
        f"- command: `{m['command']}`",
        f"- {m['date']}; {m['device']}, {m['threads']} thread(s); torch {m['torch']}; median of {m['reps']} calls",
        f"- peak: {m['peak_bytes']}",
        "",
        "| case | N x V x H | impl | fwd+bwd median | peak memory | x naive time | / naive peak |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    naive = {r["case"]: r for r in doc["rows"] if r["impl"] == "naive"}
    for r in doc["rows"]:
        base = naive.get(r["case"])
        speed = f"{base['median_s'] / r['median_s']:.2f}x" if base else "-"
        mem = f"1/{base['peak_bytes'] / r['peak_bytes']:.1f}" if base and r["peak_bytes"] else "-"
        lines.append(
            f"| {r['case']} | {r['shape']} | {r['impl']} | {r['median_s'] * 1e3:.1f} ms | "
            f"{r['peak_bytes'] / 2**20:.1f} MiB | {speed} | {mem} |"
        )
    for s in doc["skipped"]:
        lines.append(f"\n- {s['impl']}{' (' + s['case'] + ')' if 'case' in s else ''}: not measured: {s['reason']}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path, default=None, help="write the results here (JSON; a .md beside it)")
    p.add_argument("--sizes", default="", help=f"comma-separated subset of {', '.join(SIZES)} (default: per device)")
    p.add_argument(
        "--impls",
        default=",".join(DEFAULT_IMPLS),
        help=f"comma-separated subset of {', '.join(IMPLS)} (default: all but fused_compiled)",
    )
    p.add_argument("--reps", type=int, default=None, help="timed calls of each (default 5 on CUDA, 3 on CPU)")
    p.add_argument(
        "--warmup", type=int, default=None, help="untimed calls after the first (default 2 on CUDA, 1 on CPU)"
    )
    p.add_argument("--chunk-size", type=int, default=None, help="fused's chunk size (default: its own)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)

    def write(doc: dict[str, Any]) -> None:
        if args.json is None:
            return
        args.json.parent.mkdir(parents=True, exist_ok=True)
        outputs = ((args.json, json.dumps(doc, indent=1) + "\n"), (args.json.with_suffix(".md"), markdown(doc)))
        for path, text in outputs:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, path)

    doc = run(args, write)
    write(doc)
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
