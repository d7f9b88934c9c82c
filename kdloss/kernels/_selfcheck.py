"""The fused kernels' self-check: each kernel against the eager formulas on small fixed inputs.

:func:`run` is called once per ``(device, kernel, student dtype, teacher dtype)`` by
:mod:`kdloss.kernels._dispatch`. It launches the kernel (forward and backward) on inputs built to
reach the parts where a tiling or memory-ordering mistake would hide, computes the same losses
with the eager formulas of :mod:`kdloss.functional` (written out here, float32 compute, no
matrix multiply so that TF32 settings cannot blur them), and compares values and gradients:

- ``soft_kl``: (1) a reduced (``batchmean``) launch over ``REDUCE_BLOCK * 1.5 + 5`` rows, so that
  more than a thousand programs race for the ticket counter and the last one sums the rows in two
  blocks, with masked rows, a row with no finite student logit, one with no finite teacher logit
  (in the last block) and ``-inf`` classes; (2) per-row losses with cross-entropy over a class
  count just above the widest column block (two blocks, the second partial), with labels in both
  blocks, an ``ignore_index`` row, a masked row, a ``-inf`` student row and ``-inf`` entries.
- ``cohort``: 3 teachers (a padded teacher slot), classes over two column blocks (labels in
  both), ``-inf`` entries, per-teacher weights; the total, each teacher's KD, the CE and the
  gradient. (``cohort_kd`` takes no ignored labels, so the check has none.)
- ``attention``: 3 pairs in one launch, channels over two channel blocks, a ``channels_last``
  map, all-zero maps (the normaliser's ``eps`` branch); the per-sample loss and the gradient of
  every student map.

Tolerances (per compared tensor, over its finite entries; the non-finite entries must match
exactly): ``|got - ref| <= rtol * |ref| + atol * max|ref|`` with ``rtol = atol = 1e-5`` for a
float32 student and ``1e-2`` for a bfloat16/float16 one (the kernels round the gradient to the
student's dtype before, not after, the scaling by the incoming gradient).

The inputs are built on the CPU from a private generator (the global RNG is not touched) and
copied to the device; the comparison is reduced on the device and read back once.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kdloss.kernels import attention as attention_op
from kdloss.kernels import cohort as cohort_op
from kdloss.kernels import soft_kl as soft_kl_op
from kdloss.kernels._common import next_power_of_2

__all__ = ["CheckResult", "Ops", "comparisons", "run", "tolerance"]

LOG_FLOOR = -1e30  # kdloss.functional.kl's floor on log-probabilities
IGNORE = -100
NEG_INF = float("-inf")

Comparison = tuple[str, Tensor, Tensor]


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one self-check: ``ok``, its wall time, and what differed."""

    ok: bool
    ms: float
    cases: str
    worst: float
    detail: str


@dataclass(frozen=True)
class Ops:
    """The implementations under check (the fused ones by default; the tests also pass the functional API)."""

    kd_loss: Callable[..., Tensor]
    kd_rows: Callable[..., Tensor]
    cohort_rows: Callable[..., tuple[Tensor, Tensor, Tensor]]
    attention_rows: Callable[..., Tensor]


def _fused_kd_loss(s: Tensor, t: Tensor, *, temperature: float, mask: Tensor) -> Tensor:
    return soft_kl_op.fused_kd_loss(s, t, temperature=temperature, reduction="batchmean", mask=mask)


def _fused_kd_rows(s: Tensor, t: Tensor, **kw: object) -> Tensor:
    return soft_kl_op.fused_kd_rows(s, t, **kw)[0]  # type: ignore[arg-type]


FUSED = Ops(_fused_kd_loss, _fused_kd_rows, cohort_op.fused_cohort_rows, attention_op.fused_attention_rows)


def tolerance(sdt: torch.dtype, tdt: torch.dtype) -> tuple[float, float]:
    """``(rtol, atol)``: ``1e-5`` for a float32 student, ``1e-2`` for a bfloat16/float16 one.

    The student's dtype decides: the kernel writes the gradient in it. Both paths read the same
    (already rounded) teacher values and compute in float32, so the teacher's dtype does not.
    """
    return (1e-5, 1e-5) if sdt == torch.float32 else (1e-2, 1e-2)


def _randn(shape: tuple[int, ...], seed: int, scale: float = 3.0) -> Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float32, device="cpu") * scale


def _leaf(x: Tensor) -> Tensor:
    return x.detach().clone().requires_grad_(True)


def _grads(out: Tensor, weight: Tensor | float, inputs: list[Tensor]) -> list[Tensor]:
    """Gradients of ``sum(weight * out)`` w.r.t. ``inputs``; NaN (a difference) for one the graph does not reach."""
    got = torch.autograd.grad((out * weight).sum(), inputs, allow_unused=True)
    return [torch.full_like(x, float("nan")) if g is None else g for x, g in zip(inputs, got)]


# --------------------------------------------------------------------------- the eager formulas


def kd_rows_reference(
    s: Tensor,
    t: Tensor,
    *,
    temperature: float,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    ignore_index: int = IGNORE,
    kl_weight: float = 1.0,
    ce_weight: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Per-row ``kl_weight * T^2 KL + ce_weight * CE`` and the rows that count, as soft_kl / kd_ce_loss compute them."""
    sf, tf = s.float(), t.detach().float()
    valid = (s.detach().amax(dim=-1) != NEG_INF) & (t.detach().amax(dim=-1) != NEG_INF)
    if mask is not None:
        valid = valid & mask
    if labels is not None:
        valid = valid & (labels != ignore_index)
    keep = valid.unsqueeze(-1)
    s0 = torch.where(keep, sf, 0.0)
    log_q = F.log_softmax(s0 / temperature, dim=-1).clamp(min=LOG_FLOOR)
    log_p = F.log_softmax(torch.where(keep, tf, 0.0) / temperature, dim=-1).clamp(min=LOG_FLOOR)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
    rows = kl_weight * (torch.where(valid, kl, 0.0) * temperature**2)
    if ce_weight != 0.0:
        if labels is None:
            raise ValueError("ce_weight != 0 needs labels")
        ce = F.cross_entropy(s0, torch.where(valid, labels, 0), reduction="none")
        rows = rows + ce_weight * torch.where(valid, ce, 0.0)
    return rows, valid


def cohort_reference(
    s: Tensor, t: Tensor, labels: Tensor, *, temperature: float, kl_weights: Tensor, ce_weight: float
) -> tuple[Tensor, Tensor, Tensor]:
    """``(total, kd, ce)`` per row as cohort_kd's eager path computes them (weights folded into ``kl_weights``)."""
    t2 = temperature**2
    sf = s.float()
    log_q = F.log_softmax(sf / temperature, dim=-1).clamp(min=LOG_FLOOR)
    with torch.no_grad():
        log_p = F.log_softmax(t.detach().float() / temperature, dim=-1).clamp(min=LOG_FLOOR)
        p = log_p.exp()
        neg_entropy = (p * log_p).sum(dim=-1)  # (K, B)
        kd = (neg_entropy - (p * log_q.detach()).sum(dim=-1)) * t2
        w = kl_weights.float()
        p_mix = (w[:, None, None] * p).sum(dim=0)
        entropy_mix = (w[:, None] * neg_entropy).sum(dim=0)
    ce = F.cross_entropy(sf, labels, reduction="none", ignore_index=IGNORE)
    total = t2 * (entropy_mix - (p_mix * log_q).sum(dim=-1)) + ce_weight * ce
    return total, kd, ce.detach()


def attention_reference(student: list[Tensor], teacher: list[Tensor], *, beta: float) -> Tensor:
    """Per-sample ``beta * sum_j mean_i (a_s - a_t)^2`` (``p = 2``, equal spatial sizes), as attention_loss."""
    total: Tensor | None = None
    for fs, ft in zip(student, teacher):
        qs = fs.float().abs().pow(2).mean(dim=1)
        qt = ft.detach().float().abs().pow(2).mean(dim=1)
        a_s = F.normalize(qs.flatten(1), dim=1, eps=1e-12)
        a_t = F.normalize(qt.flatten(1), dim=1, eps=1e-12)
        part = (a_s - a_t).square().mean(dim=1)
        total = part if total is None else total + part
    if total is None:
        raise ValueError("attention_reference needs at least one pair")
    return beta * total


# --------------------------------------------------------------------------- the cases


def _soft_kl(device: torch.device, sdt: torch.dtype, tdt: torch.dtype, ops: Ops) -> list[Comparison]:
    out: list[Comparison] = []
    # (1) the reducing launch: two blocks of rows for the last program's sum
    rb = soft_kl_op.REDUCE_BLOCK
    rows, c = rb + rb // 2 + 5, 13
    s, t = _randn((rows, c), 1), _randn((rows, c), 2)
    s[5] = NEG_INF  # no finite student logit: the row does not count
    t[rows - 4] = NEG_INF  # no finite teacher logit, in the last block of rows
    s[7, [0, 4]] = NEG_INF  # classes of probability 0 for both
    t[7, [0, 4]] = NEG_INF
    t[9, 2] = NEG_INF  # a class the teacher rules out
    mask = torch.ones(rows, dtype=torch.bool)
    mask[3] = False
    mask[rows - 2] = False
    sd, td, md = s.to(device, sdt), t.to(device, tdt), mask.to(device)
    a, b = _leaf(sd), _leaf(sd)
    got = ops.kd_loss(a, td, temperature=2.0, mask=md)
    ref_rows, valid = kd_rows_reference(b, td, temperature=2.0, mask=md)
    ref = ref_rows.sum() / valid.sum().clamp(min=1)
    name = f"soft_kl batchmean over {rows} rows"
    out += [(f"{name}: loss", got, ref)]
    out += [(f"{name}: gradient", _grads(got, 1.7, [a])[0], _grads(ref, 1.7, [b])[0])]

    # (2) per-row losses with CE over two column blocks (the second partial)
    rows, c = 6, soft_kl_op.column_block(1 << 30) + 100
    s, t = _randn((rows, c), 3), _randn((rows, c), 4)
    labels = torch.tensor([1, c - 1, IGNORE, 7, 2, c - 96], dtype=torch.int64)
    mask = torch.tensor([True, True, True, False, True, True])
    s[4] = NEG_INF
    t[1, c - 90 :] = NEG_INF  # the teacher rules out the end of the second block (the label included)
    s[1, c - 80 : c - 70] = NEG_INF
    s[5, 10:20] = NEG_INF
    t[5, 10:20] = NEG_INF
    sd, td = s.to(device, sdt), t.to(device, tdt)
    ld, md = labels.to(device), mask.to(device)
    w = torch.tensor([1.0, 0.5, 2.0, 1.5, 0.75, 1.25]).to(device)
    a, b = _leaf(sd), _leaf(sd)
    kw = {"temperature": 3.0, "mask": md, "labels": ld, "ignore_index": IGNORE, "kl_weight": 0.7, "ce_weight": 0.3}
    got = ops.kd_rows(a, td, **kw)
    ref, _ = kd_rows_reference(b, td, **kw)  # type: ignore[arg-type]
    name = f"soft_kl + CE per row, {rows} x {c} classes"
    out += [(f"{name}: loss", got, ref)]
    out += [(f"{name}: gradient", _grads(got, w, [a])[0], _grads(ref, w, [b])[0])]
    return out


def _cohort(device: torch.device, sdt: torch.dtype, tdt: torch.dtype, ops: Ops) -> list[Comparison]:
    k, rows = 3, 5
    c = cohort_op.cohort_block(1 << 30, next_power_of_2(k)) + 77
    s, t = _randn((rows, c), 5), _randn((k, rows, c), 6)
    labels = torch.tensor([0, c - 1, 9, 5, c - 75], dtype=torch.int64)
    s[1, [3, c - 25]] = NEG_INF
    t[0, 2, :5] = NEG_INF
    t[2, 3, c - 65 :] = NEG_INF
    kl_weights = torch.tensor([0.3, 0.18, 0.12])
    sd, td, ld, wd = s.to(device, sdt), t.to(device, tdt), labels.to(device), kl_weights.to(device)
    w = torch.tensor([1.0, 0.5, 2.0, 1.5, 0.75]).to(device)
    a, b = _leaf(sd), _leaf(sd)
    total, kd, ce = ops.cohort_rows(a, td, ld, temperature=2.5, kl_weights=wd, ce_weight=0.4)
    r_total, r_kd, r_ce = cohort_reference(b, td, ld, temperature=2.5, kl_weights=wd, ce_weight=0.4)
    name = f"cohort, {k} teachers x {rows} x {c} classes"
    return [
        (f"{name}: total", total, r_total),
        (f"{name}: per-teacher KD", kd, r_kd),
        (f"{name}: CE", ce, r_ce),
        (f"{name}: gradient", _grads(total, w, [a])[0], _grads(r_total, w, [b])[0]),
    ]


def _attention(device: torch.device, sdt: torch.dtype, tdt: torch.dtype, ops: Ops) -> list[Comparison]:
    cb, _ = attention_op.attention_tiles(64)  # the widest pair is 8 x 8
    n = 3
    s_shapes = [(n, cb + 8, 8, 8), (n, 8, 5, 7), (n, 6, 3, 3)]
    t_shapes = [(n, 24, 8, 8), (n, 12, 5, 7), (n, cb + 1, 3, 3)]
    s_cpu = [_randn(shape, 10 + i, 1.0) for i, shape in enumerate(s_shapes)]
    t_cpu = [_randn(shape, 20 + i, 1.0) for i, shape in enumerate(t_shapes)]
    t_cpu[1][1] = 0.0  # an all-zero teacher map
    s_cpu[2][2] = 0.0  # an all-zero student map: the eps branch of the normaliser
    sd = [x.to(device, sdt) for x in s_cpu]
    sd[1] = sd[1].contiguous(memory_format=torch.channels_last)
    td = [x.to(device, tdt) for x in t_cpu]
    w = torch.tensor([1.0, 0.5, 2.0]).to(device)
    a = [_leaf(x) for x in sd]
    b = [_leaf(x) for x in sd]
    got = ops.attention_rows(a, td, beta=2.0)
    ref = attention_reference(b, td, beta=2.0)
    name = "attention, 3 pairs"
    out: list[Comparison] = [(f"{name}: loss", got, ref)]
    pairs = zip(_grads(got, w, a), _grads(ref, w, b))
    out += [(f"{name}: gradient of student map {j}", x, y) for j, (x, y) in enumerate(pairs)]
    return out


_CASES: dict[str, Callable[[torch.device, torch.dtype, torch.dtype, Ops], list[Comparison]]] = {
    "soft_kl": _soft_kl,
    "cohort": _cohort,
    "attention": _attention,
}


def comparisons(
    kernel: str, device: torch.device, sdt: torch.dtype, tdt: torch.dtype, ops: Ops = FUSED
) -> list[Comparison]:
    """The ``(label, got, reference)`` tensors of ``kernel``'s self-check (run in the check's isolation)."""
    with _isolated(device):
        return _CASES[kernel](device, sdt, tdt, ops)


# --------------------------------------------------------------------------- comparing


def _stats(got: Tensor, ref: Tensor, rtol: float, atol: float) -> Tensor:
    """``[largest error / its tolerance, entries whose finiteness or non-finite value differs, largest error]``."""
    g, r = got.detach().float(), ref.detach().float()
    if g.shape != r.shape:
        return torch.tensor([float("inf"), float(max(g.numel(), r.numel(), 1)), float("inf")], device=r.device)
    fin_g, fin_r = torch.isfinite(g), torch.isfinite(r)
    same_nonfinite = (g == r) | (torch.isnan(g) & torch.isnan(r))
    bad = (fin_g != fin_r) | (~fin_r & ~same_nonfinite)
    both = fin_g & fin_r
    r0 = torch.where(both, r, 0.0)
    err = (torch.where(both, g, 0.0) - r0).abs()
    bound = rtol * r0.abs() + atol * r0.abs().amax()
    ratio = (err / bound.clamp(min=1e-30)).amax()
    return torch.stack([ratio, bad.sum().float(), err.amax()])


@contextlib.contextmanager
def _isolated(device: torch.device) -> Iterator[None]:
    """Gradients on, no autocast, no inference mode, on ``device``, host syncs allowed (whatever the caller set)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        stack.enter_context(torch.autocast(device_type=device.type, enabled=False))
        if device.type == "cuda":
            stack.enter_context(torch.cuda.device(device))
            previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode(0)
            stack.callback(torch.cuda.set_sync_debug_mode, previous)
        yield


def run(kernel: str, device: torch.device, sdt: torch.dtype, tdt: torch.dtype, ops: Ops = FUSED) -> CheckResult:
    """Check ``kernel`` on ``device`` for the dtype pair: values and gradients against the eager formulas."""
    rtol, atol = tolerance(sdt, tdt)
    with _isolated(device):
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # time the check alone, not the caller's queued work
        start = time.perf_counter()
        pairs = _CASES[kernel](device, sdt, tdt, ops)
        table = torch.stack([_stats(got, ref, rtol, atol) for _, got, ref in pairs]).tolist()  # the one sync
        ms = (time.perf_counter() - start) * 1e3
    problems: list[str] = []
    worst = 0.0
    for (label, _, _), (ratio, bad, err) in zip(pairs, table):
        if bad > 0:
            problems.append(f"{label}: {int(bad)} entries are finite in one and not the other, or differ")
        if not ratio <= 1.0:  # NaN-safe
            problems.append(
                f"{label}: largest difference {err:.3g} is {ratio:.3g}x the tolerance "
                f"(rtol {rtol:g} + atol {atol:g} x max|eager|)"
            )
        worst = max(worst, ratio) if ratio == ratio else float("inf")
    cases = f"{len(pairs)} comparisons in {ms:.1f} ms"
    return CheckResult(not problems, ms, cases, worst, "; ".join(problems) + f" ({cases})" if problems else "")
