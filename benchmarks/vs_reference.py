"""kdloss against the reference implementations' formulations, side by side, on the CPU.

Every public loss at CIFAR sizes (logits 64x100 and 256x100; WRN-40-2 / WRN-16-2 feature maps and
embeddings at batch 64; one CRD step), forward + backward with respect to the student inputs, in
one process on one thread, identical float32 inputs. The baselines are ``tests/naive/reference_code.py``
(the reference code's formulations: RepDistiller, mdistiller, the DIST and ReviewKD authors' code,
PyTorch's KD tutorial), ``tests/naive/cohort.py`` (the DIH authors' per-head loops) and
``tests/naive/contrastive.py`` (the reference CRD step); the language-model losses against the logits
materialised (``tests/naive/fused_linear.py``) and top-k KD.

Method (a busy shared machine: interleave, repeat, report medians and spreads):

- before timing, kdloss and the baseline are checked to give the same loss on the first input;
- per case, ``--rounds`` rounds; in each round both implementations run a block of calls (the
  block sized to about ``--block-ms`` on the first measurement), one after the other, the order
  alternating between rounds; a block's time divided by its calls is one sample;
- reported: the median sample of each, the ratio of the medians (``x ref`` = reference median /
  kdloss median, above 1 = kdloss faster), the spread of the per-round ratios (min - max), and
  the operators each dispatches for one forward + backward (``tests/opcount.py``).

::

    PYTHONPATH=. python -m benchmarks.vs_reference                     # the table in docs/benchmarks/
    PYTHONPATH=. python -m benchmarks.vs_reference --cases kd,dkd --rounds 5 --out ''   # a quick look
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import kdloss.functional as KF
from benchmarks._cpu_alloc import pin_malloc
from tests.naive import cohort as naive_cohort
from tests.naive import fused_linear as lm_naive
from tests.naive import reference_code as ref
from tests.opcount import count_ops

Inputs = dict[str, Any]

T = 4.0  # the CIFAR-100 temperature of RepDistiller and mdistiller


@dataclass
class Case:
    name: str  # the loss
    size: str
    make: Callable[[int], Inputs]
    kdloss: Callable[[Inputs], Tensor]
    reference: Callable[[Inputs], Tensor]
    source: str  # where the baseline's formulation comes from
    grad_of: Callable[[Inputs], list[Tensor]] = lambda x: [x["s"]] if isinstance(x["s"], Tensor) else list(x["s"])
    check: bool = True
    tol: float = 1e-4
    stateful: bool = False  # a CRD step: the banks change every call


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _logits(n: int, c: int, labels: bool = False) -> Callable[[int], Inputs]:
    def make(seed: int) -> Inputs:
        g = _gen(seed)
        out: Inputs = {
            "s": (torch.randn(n, c, generator=g) * 2).requires_grad_(),
            "t": torch.randn(n, c, generator=g) * 2,
        }
        if labels:
            out["y"] = torch.randint(0, c, (n,), generator=g)
        return out

    return make


def _maps(shapes_s: list[tuple[int, ...]], shapes_t: list[tuple[int, ...]] | None = None) -> Callable[[int], Inputs]:
    def make(seed: int) -> Inputs:
        g = _gen(seed)
        s = [torch.randn(*sh, generator=g).requires_grad_() for sh in shapes_s]
        t = [torch.randn(*sh, generator=g) for sh in (shapes_t or shapes_s)]
        return {"s": s if len(s) > 1 else s[0], "t": t if len(t) > 1 else t[0]}

    return make


# WRN-16-2 (student) / WRN-40-2 (teacher) on CIFAR at batch 64: the three group outputs and the
# pooled embedding; the stem output for FSP's first flow.
B = 64
WRN = [(B, 32, 32, 32), (B, 64, 16, 16), (B, 128, 8, 8)]
LAST = (B, 128, 8, 8)
EMB = (B, 128)


def cases() -> list[Case]:
    out: list[Case] = []
    for n in (64, 256):
        size = f"{n}x100"
        out += [
            Case(
                "KD",
                size,
                _logits(n, 100),
                lambda x: KF.soft_kl(x["s"], x["t"], temperature=T),
                lambda x: ref.kd(x["s"], x["t"], T),
                "RepDistiller DistillKL",
            ),
            Case(
                "KD + CE",
                size,
                _logits(n, 100, True),
                lambda x: KF.kd_ce_loss(x["s"], x["t"], x["y"], alpha=0.9, temperature=T),
                lambda x: ref.kd_ce(x["s"], x["t"], x["y"], T, 0.9),
                "RepDistiller KD + CE",
            ),
            Case(
                "reverse KL",
                size,
                _logits(n, 100),
                lambda x: KF.soft_kl(x["s"], x["t"], temperature=T, direction="reverse"),
                lambda x: ref.reverse_kl(x["s"], x["t"], T),
                "kl_div(log_target) textbook",
            ),
            Case(
                "JSD",
                size,
                _logits(n, 100),
                lambda x: KF.soft_kl(x["s"], x["t"], temperature=T, direction="jsd", jsd_weight=0.5),
                lambda x: ref.jsd(x["s"], x["t"], T, 0.5),
                "mixture in probabilities, textbook",
            ),
            Case(
                "DKD",
                size,
                _logits(n, 100, True),
                lambda x: KF.dkd_loss(x["s"], x["t"], x["y"], alpha=1.0, beta=8.0, temperature=T),
                lambda x: ref.dkd(x["s"], x["t"], x["y"], 1.0, 8.0, T),
                "mdistiller dkd_loss",
            ),
            Case(
                "DIST",
                size,
                _logits(n, 100),
                lambda x: KF.dist_loss(x["s"], x["t"], temperature=T),
                lambda x: ref.dist(x["s"], x["t"], 1.0, 1.0, T),
                "DIST authors' code",
            ),
            Case(
                "MHKD (3 head pairs)",
                size,
                _heads(n),
                lambda x: KF.paired_head_kd(x["s"], x["t"], x["y"], temperature=T, alpha=0.9).total,
                lambda x: ref.paired_kd(x["s"], x["t"], x["y"], T, 0.9),
                "per-pair KD + CE loop (MHKD)",
            ),
            Case(
                "BYOT (3 exits)",
                size,
                _byot(n),
                lambda x: KF.self_distillation_loss(x["s"], x["f"], x["y"], temperature=3.0, alpha=0.3).total,
                lambda x: ref.self_distillation(x["s"], x["f"], x["y"], 3.0, 0.3, 0.0, [], x["f"]),
                "per-exit KD + CE loop (BYOT)",
                grad_of=lambda x: [x["s"], x["f"]],
            ),
            Case(
                "cohort KD (K=4)",
                size,
                _cohort(n),
                lambda x: KF.cohort_kd(x["s"], x["t"], x["y"], temperature=T, alpha=0.1).total,
                lambda x: naive_cohort.cohort_kl_div(x["s"], list(x["t"].unbind(0)), x["y"], T, 0.1),
                "DIH authors' per-teacher kd_loss",
            ),
        ]
    out += [
        Case(
            "FitNet hint",
            "64x128x16x16",
            _maps([(B, 128, 16, 16)]),
            lambda x: KF.hint_loss(x["s"], x["t"]),
            lambda x: ref.hint(x["s"], x["t"]),
            "RepDistiller HintLoss",
        ),
        Case(
            "cosine hidden",
            "64x1024",
            _maps([(B, 1024)]),
            lambda x: KF.cosine_hidden_loss(x["s"], x["t"]),
            lambda x: ref.cosine_hidden(x["s"], x["t"]),
            "PyTorch KD tutorial",
        ),
        Case(
            "AT (3 pairs)",
            "WRN, B=64",
            _maps(WRN),
            lambda x: KF.attention_loss(x["s"], x["t"]),
            lambda x: ref.at(x["s"], x["t"]),
            "RepDistiller Attention",
        ),
        Case(
            "FT",
            "64x64x8x8",
            _maps([(B, 64, 8, 8)]),
            lambda x: KF.ft_loss(x["s"], x["t"]),
            lambda x: ref.ft_paper(x["s"], x["t"]),
            "Kim et al.'s equation",
        ),
        Case(
            "FT (RepDistiller)",
            "64x64x8x8",
            _maps([(B, 64, 8, 8)]),
            lambda x: KF.ft_loss(x["s"], x["t"], variant="repdistiller", reduction="mean"),
            lambda x: ref.ft_repdistiller(x["s"], x["t"]),
            "RepDistiller FactorTransfer",
        ),
        Case(
            "AB",
            "64x128x8x8",
            _maps([LAST]),
            lambda x: KF.ab_loss(x["s"], x["t"]),
            lambda x: ref.ab(x["s"], x["t"]),
            "AB authors' criterion",
        ),
        Case(
            "VID",
            "64x128x8x8",
            _vid,
            lambda x: KF.vid_loss(x["s"], x["t"], x["v"]),
            lambda x: ref.vid(x["s"], x["t"], x["v"]),
            "RepDistiller VIDLoss",
            grad_of=lambda x: [x["s"], x["v"]],
        ),
        Case(
            "ReviewKD HCL",
            "WRN, B=64",
            _maps(WRN),
            lambda x: KF.hcl_loss(x["s"], x["t"]),
            lambda x: ref.hcl(x["s"], x["t"]),
            "ReviewKD hcl (mdistiller)",
        ),
        Case(
            "NST",
            "64x128x8x8",
            _maps([LAST]),
            lambda x: KF.nst_loss(x["s"], x["t"]),
            lambda x: ref.nst(x["s"], x["t"]),
            "RepDistiller NSTLoss",
        ),
        Case(
            "SP",
            "64x128x8x8",
            _maps([LAST]),
            lambda x: KF.sp_loss(x["s"], x["t"]),
            lambda x: ref.sp(x["s"], x["t"]),
            "RepDistiller Similarity",
        ),
        Case(
            "FSP",
            "WRN, B=64",
            _maps([(B, 16, 32, 32), *WRN]),
            lambda x: KF.fsp_loss(x["s"], x["t"], variant="repdistiller"),
            lambda x: ref.fsp(x["s"], x["t"]),
            "RepDistiller FSP",
        ),
        Case(
            "RKD",
            "64x128",
            _maps([EMB]),
            lambda x: KF.rkd_loss(x["s"], x["t"]),
            lambda x: ref.rkd(x["s"], x["t"]),
            "RepDistiller RKDLoss",
        ),
        Case(
            "PKT",
            "64x128",
            _maps([EMB]),
            lambda x: KF.pkt_loss(x["s"], x["t"]),
            lambda x: ref.pkt(x["s"], x["t"]),
            "RepDistiller PKT",
            tol=1e-3,
        ),
        Case(
            "CC",
            "64x128",
            _maps([EMB]),
            lambda x: KF.cc_loss(x["s"], x["t"]),
            lambda x: ref.cc_paper(x["s"], x["t"]),
            "Peng et al.'s equation",
        ),
        Case(
            "CC (RepDistiller)",
            "64x128",
            _maps([EMB]),
            lambda x: KF.cc_loss(x["s"], x["t"], variant="repdistiller"),
            lambda x: ref.cc_repdistiller(x["s"], x["t"]),
            "RepDistiller Correlation",
        ),
        _crd_case(),
        *_lm_cases(),
    ]
    return out


# A small language-model head: 256 tokens, hidden size 128, vocabulary 4096 (sizes that run in a few
# milliseconds on one CPU thread); the sparse teacher keeps its top 32 classes.
LM_N, LM_H, LM_V, LM_K = 256, 128, 4096, 32


def _lm_head(seed: int) -> Inputs:
    g = _gen(seed)
    return {
        "s": torch.randn(LM_N, LM_H, generator=g).requires_grad_(),  # the student's hidden states
        "w": (torch.randn(LM_V, LM_H, generator=g) * LM_H**-0.5).requires_grad_(),
        "ht": torch.randn(LM_N, LM_H, generator=g),
        "wt": torch.randn(LM_V, LM_H, generator=g) * LM_H**-0.5,
    }


def _lm_sparse(seed: int) -> Inputs:
    g = _gen(seed)
    lp, idx = torch.log_softmax(torch.randn(LM_N, LM_V, generator=g) * 2, -1).topk(LM_K, -1)
    return {"s": (torch.randn(LM_N, LM_V, generator=g) * 2).requires_grad_(), "lp": lp, "idx": idx}


def _topk_kd(s: Tensor, lp: Tensor, idx: Tensor, temperature: float) -> Tensor:
    """Top-k KD as usually written: the teacher's top-k renormalised at T against the student's log-softmax there."""
    log_q = torch.log_softmax(s / temperature, dim=-1).gather(1, idx)
    p = torch.softmax(lp / temperature, dim=-1)
    return (p * (p.log() - log_q)).sum(-1).mean() * temperature**2


def _lm_cases() -> list[Case]:
    size = f"{LM_N} tokens, H={LM_H}, V={LM_V}"
    out = [
        Case(
            f"fused linear KD ({chunks})",
            size,
            _lm_head,
            lambda x, c=chunk: KF.fused_linear_kd(x["s"], x["w"], x["ht"], x["wt"], temperature=T, chunk_size=c),
            lambda x: lm_naive.lm_kl_div(x["s"], x["w"], x["ht"], x["wt"], T),
            "logits materialised + log_softmax + kl_div",
            grad_of=lambda x: [x["s"], x["w"]],
        )
        for chunks, chunk in (("1 chunk", LM_N), ("4 chunks", LM_N // 4))
    ]
    out.append(
        Case(
            "sparse KD (top-32)",
            f"{LM_N}x{LM_V}",
            _lm_sparse,
            lambda x: KF.sparse_kd(x["s"], x["lp"], x["idx"], temperature=T),
            lambda x: _topk_kd(x["s"], x["lp"], x["idx"], T),
            "top-k KD, renormalised top-k (textbook)",
        )
    )
    return out


def _cohort(n: int) -> Callable[[int], Inputs]:
    def make(seed: int) -> Inputs:
        g = _gen(seed)
        return {
            "s": torch.randn(n, 100, generator=g).requires_grad_(),
            "t": torch.randn(4, n, 100, generator=g),
            "y": torch.randint(0, 100, (n,), generator=g),
        }

    return make


def _heads(n: int) -> Callable[[int], Inputs]:
    def make(seed: int) -> Inputs:
        g = _gen(seed)
        return {
            "s": (torch.randn(3, n, 100, generator=g) * 2).requires_grad_(),
            "t": torch.randn(3, n, 100, generator=g) * 2,
            "y": torch.randint(0, 100, (n,), generator=g),
        }

    return make


def _byot(n: int) -> Callable[[int], Inputs]:
    def make(seed: int) -> Inputs:
        g = _gen(seed)
        return {
            "s": (torch.randn(3, n, 100, generator=g) * 2).requires_grad_(),
            "f": (torch.randn(n, 100, generator=g) * 2).requires_grad_(),
            "y": torch.randint(0, 100, (n,), generator=g),
        }

    return make


def _vid(seed: int) -> Inputs:
    g = _gen(seed)
    return {
        "s": torch.randn(*LAST, generator=g).requires_grad_(),
        "t": torch.randn(*LAST, generator=g),
        "v": (torch.rand(LAST[1], generator=g) + 0.5).requires_grad_(),  # learned (VIDRegressor's)
    }


def _crd_case() -> Case:
    from benchmarks.test_bench_crd import Bench, Size

    size = Size(64, 4096, 128, 50_000, 256)
    bench = Bench(size, "cpu")

    def make(seed: int) -> Inputs:
        return {"s": bench.fs}

    return Case(
        "CRD step",
        f"B={size.batch} K={size.k} d={size.feat_dim} N={size.n_data}",
        make,
        lambda x: bench.crd(bench.fs, bench.ft, bench.idx, negatives=bench.neg),
        lambda x: bench.naive(bench.fs, bench.ft, bench.idx, bench.neg),
        "reference CRD step (tests/naive/contrastive.py)",
        grad_of=lambda x: [bench.fs, *bench.crd.parameters(), *bench.naive.parameters()],
        check=False,
        stateful=True,
    )


def _step(fn: Callable[[Inputs], Tensor], x: Inputs, grad_of: list[Tensor]) -> Callable[[], object]:
    def call() -> object:
        loss = fn(x)
        return torch.autograd.grad(loss, grad_of, allow_unused=True)

    return call


def _ops(fn: Callable[[Inputs], Tensor], x: Inputs, grad_of: list[Tensor]) -> int:
    return count_ops(lambda: fn(x), [g for g in grad_of]).total


def _block(call: Callable[[], object], n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        call()
    return (time.perf_counter() - t0) / n


def measure(case: Case, rounds: int, block_ms: float) -> dict[str, Any]:
    x = case.make(0)
    grad_of = case.grad_of(x)
    if case.check:
        with torch.no_grad():
            a, b = float(case.kdloss(x)), float(case.reference(x))
        if not math.isclose(a, b, rel_tol=case.tol, abs_tol=case.tol):
            raise AssertionError(f"{case.name} {case.size}: kdloss {a} != reference {b}")
    ops = {"kdloss": _ops(case.kdloss, x, grad_of), "reference": _ops(case.reference, x, grad_of)}
    calls = {"kdloss": _step(case.kdloss, x, grad_of), "reference": _step(case.reference, x, grad_of)}
    for call in calls.values():  # warm-up
        for _ in range(3):
            call()
    n = {k: max(1, int(block_ms / 1e3 / max(_block(c, 3), 1e-7))) for k, c in calls.items()}
    samples: dict[str, list[float]] = {"kdloss": [], "reference": []}
    for r in range(rounds):
        order = ("kdloss", "reference") if r % 2 == 0 else ("reference", "kdloss")
        for k in order:
            samples[k].append(_block(calls[k], n[k]))
    ratios = [rr / kk for rr, kk in zip(samples["reference"], samples["kdloss"])]
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {
        "name": case.name,
        "size": case.size,
        "source": case.source,
        "median_s": med,
        "samples_s": samples,
        "calls_per_block": n,
        "x_ref": med["reference"] / med["kdloss"],
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "ops": ops,
    }


def _fmt(s: float) -> str:
    return f"{s * 1e6:.0f} us" if s < 1e-2 else f"{s * 1e3:.1f} ms"


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [
        "# kdloss against the reference implementations (CPU)",
        "",
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']}; git commit {meta['commit']}; host load average at start {meta['loadavg']}",
        f"- host: {meta['cpu']}; torch {meta['torch']}, python {meta['python']}; {meta['threads']} thread; "
        f"host memory: {meta.get('allocator', '?')}",
        f"- forward + backward w.r.t. the student inputs, float32, interleaved blocks of calls (~{meta['block_ms']} ms "
        f"each), {meta['rounds']} rounds, order alternating; medians per call",
        "- `x ref` = reference median / kdloss median (above 1: kdloss faster); `spread` = the lowest and highest "
        "per-round ratio; `ops` = aten operators dispatched by one forward + backward (kdloss / reference)",
        "",
        "| loss | size | reference formulation | kdloss | reference | x ref | spread | ops |",
        "|---|---|---|---:|---:|---:|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['size']} | {r['source']} | {_fmt(r['median_s']['kdloss'])} | "
            f"{_fmt(r['median_s']['reference'])} | {r['x_ref']:.2f} | {r['ratio_min']:.2f}-{r['ratio_max']:.2f} | "
            f"{r['ops']['kdloss']} / {r['ops']['reference']} |"
        )
    ratios = [r["x_ref"] for r in rows]
    if ratios:
        geo = math.exp(sum(math.log(v) for v in ratios) / len(ratios))
        worst = min(rows, key=lambda r: r["x_ref"])
        lines += [
            "",
            f"Geometric mean of `x ref` over the {len(rows)} rows: {geo:.2f}; lowest: {worst['x_ref']:.2f} "
            f"({worst['name']}, {worst['size']}).",
        ]
    return "\n".join(lines) + "\n"


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
    p.add_argument("--cases", default="", help="comma-separated substrings of case names (default: all)")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--block-ms", type=float, default=40.0)
    p.add_argument("--out", default="docs/benchmarks/vs-reference-cpu", help="output path without suffix ('' = none)")
    p.add_argument(
        "--default-malloc",
        action="store_true",
        help="keep glibc's dynamic mmap/trim thresholds (default: fixed, see benchmarks/_cpu_alloc.py)",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    allocator = "default allocator (--default-malloc)" if args.default_malloc else pin_malloc()
    wanted = [w.strip().lower() for w in args.cases.split(",") if w.strip()]
    todo = [c for c in cases() if not wanted or any(w in c.name.lower() for w in wanted)]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "?"
    meta = {
        "command": "PYTHONPATH=. python -m benchmarks.vs_reference " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit,
        "loadavg": " / ".join(f"{v:.1f}" for v in os.getloadavg()) + " (1/5/15 min)",
        "cpu": _cpu_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "block_ms": args.block_ms,
        "allocator": allocator,
    }
    rows = []
    for case in todo:
        row = measure(case, args.rounds, args.block_ms)
        rows.append(row)
        print(
            f"{case.name:18s} {case.size:26s} kdloss {_fmt(row['median_s']['kdloss']):>9s}  "
            f"ref {_fmt(row['median_s']['reference']):>9s}  x{row['x_ref']:.2f} "
            f"({row['ratio_min']:.2f}-{row['ratio_max']:.2f})  ops {row['ops']['kdloss']}/{row['ops']['reference']}",
            flush=True,
        )
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": rows}, indent=1) + "\n")
        out.with_suffix(".md").write_text(markdown(meta, rows))
        print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
