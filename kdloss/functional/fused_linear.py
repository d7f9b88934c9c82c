r"""Distilling language models: KD losses that never hold the full ``(N, V)`` logits.

Two functions for vocabulary-scale distillation:

- :func:`fused_linear_kd` takes the student's and the teacher's last hidden states and output
  weights, and computes the logits, the divergence, the optional cross-entropy and the gradients
  one chunk of tokens at a time inside one :class:`torch.autograd.Function`, so that the full
  logits never exist;
- :func:`sparse_kd` takes the teacher as its top-k log-probabilities per token (the form in which
  teacher outputs are stored for offline distillation, see :class:`kdloss.TeacherTopK`), plus the
  optional probability mass outside the top-k.

Both follow kdloss's KL convention (``KL(p_teacher || p_student)`` on temperature-softened
distributions, float32 internals, teacher detached, the soft term multiplied by ``T**2``).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from kdloss._numerics import detached
from kdloss._validate import (
    Reduction,
    ShapeError,
    check_float,
    check_int,
    check_integer,
    check_nonnegative,
    check_positive,
    check_positive_int,
    check_reduction,
    check_unit_interval,
    compute_dtype,
)

__all__ = [
    "LM_REDUCTIONS",
    "Divergence",
    "check_divergence",
    "check_loss_weights",
    "default_chunk_size",
    "fused_linear_kd",
    "sparse_kd",
]

Divergence = Literal["forward", "reverse", "jsd", "tv"]
"""``"forward"``: KL(p_teacher || p_student) (Hinton's KD); ``"reverse"``: KL(p_student ||
p_teacher) (mode-seeking); ``"jsd"``: the generalised Jensen-Shannon divergence with weight ``jsd_weight``
on the teacher; ``"tv"``: the total variation distance ``1/2 sum |p - q|``."""

DIVERGENCES: tuple[str, ...] = get_args(Divergence)

LM_REDUCTIONS: tuple[str, ...] = ("none", "sum", "batchmean")
"""The reductions of :func:`fused_linear_kd` and :func:`sparse_kd` (a per-token mean is ``batchmean``)."""

# Bytes of one (chunk, V) float32 buffer that the default chunk size aims at: the CPU keeps the
# peak low (a few such buffers live at once); a GPU needs fewer, larger chunks for its matmuls and
# for the per-chunk pass over the weight gradient's accumulator (see docs/lm.md).
_CHUNK_BUDGET_BYTES = {"cpu": 32 * 2**20, "cuda": 256 * 2**20}
_MIN_CHUNK, _MAX_CHUNK = 16, 8192

_ADDMM_OUT_DTYPE = torch.__version__ >= "2.8"  # torch.addmm(..., out_dtype=) on CUDA


def check_divergence(divergence: str, jsd_weight: float | None) -> float:
    """Validate ``divergence`` and ``jsd_weight``; return the JSD mixture weight (0.5 unless given).

    Raises:
        ValueError: an unknown divergence, ``jsd_weight`` outside ``(0, 1)`` or given with another divergence.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {', '.join(map(repr, DIVERGENCES))}, got {divergence!r}")
    if divergence == "jsd":
        return 0.5 if jsd_weight is None else check_unit_interval("jsd_weight", jsd_weight, open_ends=True)
    if jsd_weight is not None:
        raise ValueError(
            f"jsd_weight is the JSD mixture weight and needs divergence='jsd', got divergence={divergence!r}"
        )
    return 0.5


def default_chunk_size(num_classes: int, device: torch.device | str) -> int:
    """The chunk of tokens :func:`fused_linear_kd` processes at once when ``chunk_size=None``.

    The largest power of two whose ``(chunk, V)`` float32 buffer fits 32 MiB on the CPU (256 MiB
    on a GPU), clamped to ``[16, 8192]``: 256 tokens at V = 32,000 on the CPU, 512 at V = 128,256
    on a GPU. A chunk holds about three such buffers at a time.

    Example:
        >>> default_chunk_size(32000, "cpu"), default_chunk_size(128256, "cuda")
        (256, 512)
    """
    kind = torch.device(device).type
    budget = _CHUNK_BUDGET_BYTES.get(kind, _CHUNK_BUDGET_BYTES["cpu"])
    rows = max(1, budget // (4 * max(1, num_classes)))
    return int(min(_MAX_CHUNK, max(_MIN_CHUNK, 1 << (rows.bit_length() - 1))))


# ------------------------------------------------------------------------------- validation helpers


def _check_labels(
    labels: Tensor, rows_shape: torch.Size, device: torch.device, num_classes: int, ignore_index: int
) -> bool:
    """Validate ``labels``; return whether they are known (read on the host: CPU tensors outside
    ``torch.compile``) to be classes, none of them ``ignore_index``: then every token counts and no
    mask is needed."""
    check_integer("labels", labels)
    if labels.shape != rows_shape:
        raise ShapeError(
            f"labels must have the hidden states' shape without the feature dimension, {tuple(rows_shape)}, "
            f"got {tuple(labels.shape)}"
        )
    if labels.device != device:
        raise ValueError(f"labels must be on the inputs' device {device}, got {labels.device}")
    if labels.device.type == "cpu" and labels.numel() > 0 and not torch.compiler.is_compiling():
        lo, hi = torch.aminmax(labels)
        if int(lo) >= 0 and int(hi) < num_classes:  # every label a class (the common case: one reduction)
            return not 0 <= ignore_index < num_classes or not bool((labels == ignore_index).any())
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
        if bool(bad.any()):
            raise ValueError(
                f"labels must lie in [0, {num_classes}) or equal ignore_index={ignore_index}, got {int(labels[bad][0])}"
            )
    return False


def check_loss_weights(hard_weight: float, soft_weight: float) -> tuple[float, float]:
    """Validate the weights of the hard (cross-entropy) and soft (distillation) terms; return them as floats.

    Raises:
        TypeError, ValueError: a weight that is not a finite number >= 0, or both weights 0.
    """
    hw = check_nonnegative("hard_weight", hard_weight)
    sw = check_nonnegative("soft_weight", soft_weight)
    if hw == 0.0 and sw == 0.0:
        raise ValueError("hard_weight and soft_weight are both 0: the loss would be 0 whatever the inputs")
    return hw, sw


def _check_weights(hard_weight: float, soft_weight: float, labels: Tensor | None) -> tuple[float, float]:
    hw, sw = check_loss_weights(hard_weight, soft_weight)
    if hw > 0.0 and labels is None:
        raise ValueError(f"hard_weight={hw} > 0 needs labels for the cross-entropy term, got labels=None")
    return hw, sw


def _matmul_dtype(name_x: str, x: Tensor, name_w: str, w: Tensor) -> torch.dtype:
    """The dtype the logits' matmul runs in: autocast's when it is on for the device, else the inputs'."""
    kind = x.device.type
    if kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind) and torch.float64 not in (x.dtype, w.dtype):
        return torch.get_autocast_dtype(kind)
    if x.dtype != w.dtype:
        raise TypeError(f"{name_x} and {name_w} must have the same dtype outside autocast, got {x.dtype} and {w.dtype}")
    return x.dtype


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Autocast off inside the loss: its matmuls run in the dtype chosen up front, its reductions in float32."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


class _Config:
    """The non-tensor options of one call (a plain object: torch.compile treats it as a constant)."""

    def __init__(
        self,
        *,
        temperature: float,
        divergence: str,
        beta: float,
        hard_weight: float,
        soft_weight: float,
        chunk_size: int,
        reduction: str,
        mm_dtype: torch.dtype,
        mm_dtype_t: torch.dtype,
        cdtype: torch.dtype,
        need: tuple[bool, bool, bool],
    ) -> None:
        self.temperature, self.divergence, self.beta = temperature, divergence, beta
        self.hard_weight, self.soft_weight = hard_weight, soft_weight
        self.chunk_size, self.reduction = chunk_size, reduction
        self.mm_dtype, self.mm_dtype_t, self.cdtype, self.need = mm_dtype, mm_dtype_t, cdtype, need


# ------------------------------------------------------------------------------- the chunk arithmetic


def _log_probs(x: Tensor, weight: Tensor, bias: Tensor | None, temperature: float, dtype: torch.dtype) -> Tensor:
    """``log_softmax((x @ weight.T + bias) / T)`` in ``dtype``; the logits are a temporary of this call."""
    z = x @ weight.t()
    if bias is None and temperature == 1.0:
        return torch.log_softmax(z, dim=-1, dtype=dtype)  # the cast to float32 happens inside the kernel
    z = z.to(dtype) if z.dtype != dtype else z
    if bias is not None:
        z.add_(bias)
    if temperature != 1.0:
        z.div_(temperature)
    return torch.log_softmax(z, dim=-1)


def _chunk(
    cfg: _Config,
    hs: Tensor,
    w: Tensor,
    b: Tensor | None,
    hts: Tensor | None,
    wt: Tensor,
    bt: Tensor | None,
    y: Tensor | None,
    *,
    want_value: bool,
    want_grad: bool,
) -> tuple[Tensor | None, Tensor | None, float]:
    """One chunk: the per-row losses ``(C,)``, and ``(G, c)``: ``c * G`` is their gradient w.r.t. the student logits.

    The soft term of a row is ``soft_weight * T**2 * D(p, q)``, ``p = softmax(t / T)``, ``q =
    softmax(s / T)``; its gradient with respect to ``s`` is ``soft_weight * T * dD/dz`` (``z = s /
    T``). The hard term is ``hard_weight * CE(s, y)`` at temperature 1, with gradient ``hard_weight *
    (softmax(s) - onehot(y))``. The scalar ``c`` is applied by the caller on the ``(C, H)`` side of
    the matmuls, with the rows' weights, so that ``G`` is not scaled element by element. The ``(C,
    V)`` buffers are reused in place: a chunk holds about three of them at a time.
    """
    T, hw, sw, cd = cfg.temperature, cfg.hard_weight, cfg.soft_weight, cfg.cdtype
    log_q = _log_probs(hs, w, b, T, cd)
    value: Tensor | None = None
    hard_soft: Tensor | None = None  # softmax of the raw logits when T != 1 (at T = 1 it is q)
    idx = y.unsqueeze(1) if y is not None and want_grad else None
    if hw > 0.0:
        assert y is not None
        # -log_softmax(s)[y] per row: nll_loss's kernel (y holds classes only: ignored rows read class 0)
        if T == 1.0:
            value = hw * torch.ops.aten.nll_loss_forward(log_q, y, None, 0, -100)[0]
        else:
            raw = torch.log_softmax(log_q * T, dim=-1)  # T * log q = s - T lse(z): same softmax as s
            value = hw * torch.ops.aten.nll_loss_forward(raw, y, None, 0, -100)[0]
            if want_grad:
                hard_soft = raw.exp_()
            del raw

    if sw == 0.0:  # cross-entropy alone: the teacher is not computed at all
        if not want_grad:
            return value, None, 1.0
        assert idx is not None
        ce_grad = log_q.exp_() if hard_soft is None else hard_soft
        return value, ce_grad.scatter_add_(1, idx, _column(ce_grad, -1.0)), hw

    assert hts is not None
    log_p = _log_probs(hts, wt, bt, T, cd)
    c = sw * T  # d(soft)/ds = c * dD/dz, before the divergence's own constant
    grad: Tensor | None = None
    div: Tensor | None = None
    if cfg.divergence == "forward":
        p = log_p.exp()
        if want_value:
            div = log_p.sub_(log_q).mul_(p).sum(dim=-1)  # sum p (log p - log q)
        del log_p
        if want_grad:
            q = log_q.exp_()
            if hw > 0.0 and hard_soft is None:  # c (q - p) + hw (q - onehot) = c ((1 + hw/c) q - p - hw/c onehot)
                q.mul_(1.0 + hw / c)
            grad = q.sub_(p)
    elif cfg.divergence == "reverse":
        d = log_p.neg_().add_(log_q)  # log q - log p
        q = log_q.exp_()
        div = (q * d).sum(dim=-1)
        if want_grad:
            grad = d.sub_(div.unsqueeze(1)).mul_(q)  # q (log q - log p - KL(q || p))
    elif cfg.divergence == "jsd":
        beta = cfg.beta
        log_m = log_p + math.log(beta)
        log_m = torch.logaddexp(log_m, log_q + math.log1p(-beta), out=log_m)  # log(beta p + (1 - beta) q)
        p = log_p.exp()
        kl_pm = log_p.sub_(log_m).mul_(p).sum(dim=-1)
        del p, log_p
        d = log_m.neg_().add_(log_q)  # log q - log m
        q = log_q.exp_()
        kl_qm = (q * d).sum(dim=-1)
        div = beta * kl_pm + (1.0 - beta) * kl_qm
        if want_grad:
            grad = d.sub_(kl_qm.unsqueeze(1)).mul_(q)  # dD/dz = (1 - beta) q (log q - log m - KL(q || m))
            c *= 1.0 - beta
    else:  # total variation
        q = log_q.exp_()
        d = log_p.exp_().neg_().add_(q)  # q - p
        div = 0.5 * torch.linalg.vector_norm(d, ord=1, dim=-1)
        if want_grad:
            sign = d.sign_()
            grad = sign.sub_((q * sign).sum(dim=-1, keepdim=True)).mul_(q)  # dD/dz = q (sign - sum q sign) / 2
            c *= 0.5
    if want_value:
        assert div is not None
        soft = (sw * T * T) * div
        value = soft if value is None else value + soft
    if not want_grad:
        return value, None, 1.0
    assert grad is not None
    if hw > 0.0:
        assert idx is not None
        r = hw / c
        if cfg.divergence != "forward" or hard_soft is not None:
            grad.add_(q if hard_soft is None else hard_soft, alpha=r)
        grad.scatter_add_(1, idx, _column(grad, -r))
    return value, grad, c


def _column(like: Tensor, value: float) -> Tensor:
    """A ``(rows, 1)`` column of ``value`` in ``like``'s dtype and device (one operator)."""
    return torch.full((like.shape[0], 1), value, dtype=like.dtype, device=like.device)


def _accumulate_mm(acc: Tensor | None, a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    """``acc + a @ b`` (in place) with ``acc`` in the compute dtype ``dtype`` (float32) and ``a``, ``b``
    possibly in bf16/fp16; ``acc=None`` (the first chunk): ``a @ b`` itself is the accumulator."""
    if acc is None:
        if a.dtype == dtype:
            return a @ b
        if not (a.is_cuda and _ADDMM_OUT_DTYPE and not torch.compiler.is_compiling()):
            return (a @ b).to(dtype)  # the chunk's product rounded once, as below
        acc = torch.zeros((a.shape[0], b.shape[1]), dtype=dtype, device=a.device)
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif acc.is_cuda and _ADDMM_OUT_DTYPE and not torch.compiler.is_compiling():
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)  # float32 accumulation inside the matmul
    else:
        acc.add_(a @ b)  # the chunk's product rounded once, the sum over chunks in float32
    return acc


def _run_chunks(
    cfg: _Config,
    h: Tensor,
    w: Tensor,
    b: Tensor | None,
    ht: Tensor,
    wt: Tensor,
    bt: Tensor | None,
    y: Tensor | None,
    valid: Tensor | None,
    row_weight: Tensor | float,
    *,
    want_value: bool,
    want_grad: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Loop over chunks of tokens: per-row values ``(N,)`` and the gradients of ``sum_i row_weight_i * loss_i``.

    Returns ``(values, grad_h, grad_w, grad_b)``: ``grad_h`` in ``h``'s dtype, ``grad_w`` and
    ``grad_b`` in the compute dtype (their accumulators over chunks).
    """
    n = h.shape[0]
    cd = cfg.cdtype
    need_h, need_w, need_b = cfg.need if want_grad else (False, False, False)
    need_b = need_b and b is not None
    w_mm = w.to(cfg.mm_dtype)
    wt_mm = wt.to(cfg.mm_dtype_t) if cfg.soft_weight > 0.0 else wt
    b_cd = b.to(cd) if b is not None else None
    bt_cd = bt.to(cd) if bt is not None else None
    # One chunk (every row at once): its results are the outputs, with no buffers to allocate and copy
    # into; with several, (N,) and (N, H) buffers filled chunk by chunk, float32 accumulators for W, b.
    single = n <= cfg.chunk_size
    values = torch.empty(n, dtype=cd, device=h.device) if want_value and not single else None
    grad_h = torch.empty_like(h) if need_h and not single else None
    grad_w: Tensor | None = None
    grad_b: Tensor | None = None
    want_chunk_grad = need_h or need_w or need_b
    for start in range(0, n, cfg.chunk_size):
        stop = min(start + cfg.chunk_size, n)
        hs = (h if single else h[start:stop]).to(cfg.mm_dtype)
        vc = (valid if single else valid[start:stop]).unsqueeze(1) if valid is not None else None
        if vc is not None:  # rows that do not count: zeros in, so that nothing there can become NaN
            hs = torch.where(vc, hs, 0.0)
        hts: Tensor | None = None
        if cfg.soft_weight > 0.0:
            hts = (ht if single else ht[start:stop]).to(cfg.mm_dtype_t)
            if vc is not None:
                hts = torch.where(vc, hts, 0.0)
        val, g, c = _chunk(
            cfg,
            hs,
            w_mm,
            b_cd,
            hts,
            wt_mm,
            bt_cd,
            (y if single else y[start:stop]) if y is not None else None,
            want_value=want_value,
            want_grad=want_chunk_grad,
        )
        del hts
        if want_value and val is not None:
            if single:
                values = val
            else:
                assert values is not None
                values[start:stop] = val
        if g is None:
            continue
        # the rows' weights (and c) are applied on the (C, H) side of the matmuls, not to G
        rw = row_weight if single or not isinstance(row_weight, Tensor) else row_weight[start:stop]
        scale: Tensor | float = rw.mul(c).unsqueeze(1) if isinstance(rw, Tensor) else rw * c
        if need_b:
            part = torch.mv(g.t(), scale.squeeze(1)) if isinstance(scale, Tensor) else g.sum(dim=0)
            if grad_b is None:  # the first chunk's sum is the accumulator
                grad_b = part if isinstance(scale, Tensor) or scale == 1.0 else part.mul_(scale)
            elif isinstance(scale, Tensor):
                grad_b.add_(part)
            else:
                grad_b.add_(part, alpha=scale)
        g_mm = g.to(cfg.mm_dtype) if g.dtype != cfg.mm_dtype else g
        del g
        if need_h:
            gh = g_mm @ w_mm
            gh = gh.mul_(scale) if gh.dtype == cd else gh * scale
            if single:
                grad_h = gh if gh.dtype == h.dtype else gh.to(h.dtype)
            else:
                assert grad_h is not None
                grad_h[start:stop] = gh
            del gh
        if need_w:
            hs_scaled = hs if not isinstance(scale, Tensor) and scale == 1.0 else (hs * scale).to(cfg.mm_dtype)
            grad_w = _accumulate_mm(grad_w, g_mm.t(), hs_scaled, cd)
            del hs_scaled
        del g_mm, hs
    if need_w and grad_w is None:  # no rows
        grad_w = torch.zeros(w.shape, dtype=cd, device=w.device)
    if need_b and grad_b is None:
        grad_b = torch.zeros(w.shape[0], dtype=cd, device=w.device)
    if want_value and values is None:
        values = torch.empty(n, dtype=cd, device=h.device)
    if need_h and grad_h is None:
        grad_h = torch.empty_like(h)
    return values, grad_h, grad_w, grad_b


class _FusedLinearKD(torch.autograd.Function):
    """Chunked linear + KD. With a scalar reduction the gradients are computed in the forward pass
    (each logit is computed once) and scaled by ``grad_output`` in the backward pass; with
    ``reduction="none"`` the backward pass recomputes each chunk's logits with its rows' weights."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        h: Tensor,
        w: Tensor,
        b: Tensor | None,
        ht: Tensor,
        wt: Tensor,
        bt: Tensor | None,
        y: Tensor | None,
        valid: Tensor | None,
        count: Tensor | None,
        cfg: _Config,
    ) -> Tensor:
        ctx.cfg = cfg
        ctx.dtypes = (w.dtype, b.dtype if b is not None else None)
        ctx.precomputed = False
        n = h.shape[0]
        # batchmean: the sum over the rows that count, divided by their number
        inv: Tensor | float = 1.0
        if cfg.reduction == "batchmean":
            inv = 1.0 / count.clamp(min=1).to(cfg.cdtype) if count is not None else 1.0 / max(n, 1)
        with _no_autocast(h.device):
            if cfg.reduction == "none" or not any(cfg.need):
                values, _, _, _ = _run_chunks(cfg, h, w, b, ht, wt, bt, y, valid, 1.0, want_value=True, want_grad=False)
                assert values is not None
                if valid is not None:
                    values = torch.where(valid, values, 0.0)
                if cfg.reduction != "none":  # no gradient wanted: nothing to keep
                    return values.sum() * inv
                ctx.save_for_backward(h, w, b, ht, wt, bt, y, valid)
                return values
            # a scalar reduction with gradients: everything in one pass, the gradients pre-scaled
            row_weight: Tensor | float = valid.to(cfg.cdtype) * inv if valid is not None else inv
            values, gh, gw, gb = _run_chunks(
                cfg, h, w, b, ht, wt, bt, y, valid, row_weight, want_value=True, want_grad=True
            )
            assert values is not None
            if valid is not None:
                values = torch.where(valid, values, 0.0)
            total = values.sum() * inv
            gw = gw.to(w.dtype) if gw is not None and gw.dtype != w.dtype else gw
            gb = gb.to(b.dtype) if gb is not None and b is not None and gb.dtype != b.dtype else gb
            ctx.save_for_backward(gh, gw, gb)
            ctx.precomputed = True
            return total

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        cfg: _Config = ctx.cfg
        nones = (None,) * 7
        if ctx.precomputed:
            # out of place: a second backward (retain_graph=True) must find the saved gradients intact
            gh, gw, gb = ctx.saved_tensors
            return (
                gh * grad_out.to(gh.dtype) if gh is not None else None,
                gw * grad_out.to(gw.dtype) if gw is not None else None,
                gb * grad_out.to(gb.dtype) if gb is not None else None,
                *nones,
            )
        # reduction="none": recompute each chunk with its rows' weights grad_out[i]
        h, w, b, ht, wt, bt, y, valid = ctx.saved_tensors
        with _no_autocast(h.device):
            row_weight = grad_out.to(cfg.cdtype).reshape(h.shape[0])
            if valid is not None:
                row_weight = torch.where(valid, row_weight, 0.0)
            _, gh, gw, gb = _run_chunks(
                cfg, h, w, b, ht, wt, bt, y, valid, row_weight, want_value=False, want_grad=True
            )
        w_dtype, b_dtype = ctx.dtypes
        gw = gw.to(w_dtype) if gw is not None and gw.dtype != w_dtype else gw
        gb = gb.to(b_dtype) if gb is not None and b_dtype is not None and gb.dtype != b_dtype else gb
        return (gh, gw, gb, *nones)


def fused_linear_kd(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    labels: Tensor | None = None,
    *,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    temperature: float = 1.0,
    divergence: Divergence = "forward",
    jsd_weight: float | None = None,
    hard_weight: float = 0.0,
    soft_weight: float = 1.0,
    ignore_index: int = -100,
    reduction: Reduction = "batchmean",
    chunk_size: int | None = None,
) -> Tensor:
    r"""Output projection + distillation loss of a language model, without materialising the logits.

    With the student's logits :math:`s = h_s W_s^\top + b_s` and the teacher's :math:`t = h_t
    W_t^\top + b_t` of one token, :math:`p = \mathrm{softmax}(t / T)`, :math:`q =
    \mathrm{softmax}(s / T)` and the label :math:`y`, the unreduced loss of the token is

    .. math::

        \ell = w_{\text{soft}}\, T^2\, D(p, q) + w_{\text{hard}} \left(\log \sum_c e^{s_c} - s_y\right),

    where :math:`D` is one of

    .. math::

        D_{\text{forward}} = \sum_c p_c \log\frac{p_c}{q_c}, \quad
        D_{\text{reverse}} = \sum_c q_c \log\frac{q_c}{p_c}, \quad
        D_{\text{tv}} = \tfrac12 \sum_c |p_c - q_c|,

    .. math::

        D_{\text{jsd}} = \beta \sum_c p_c \log\frac{p_c}{m_c} + (1 - \beta) \sum_c q_c \log\frac{q_c}{m_c},
        \quad m = \beta p + (1 - \beta) q, \quad \beta = \text{jsd\_weight} .

    The cross-entropy is at temperature 1 on the raw logits. The tokens are processed
    ``chunk_size`` at a time: each chunk's logits ``(chunk, V)``, the loss and the gradients with
    respect to the student's hidden states, weight and bias are computed and the chunk's logits
    freed, so the memory beyond the inputs and the gradients is ``O(chunk_size * V)`` instead of
    ``O(N * V)``. With ``reduction`` ``"sum"`` or ``"batchmean"`` the gradients are computed in the
    forward pass (each logit is computed once); with ``"none"`` the backward pass recomputes the
    logits. The teacher tensors never receive a gradient. Softmaxes, divergences and the
    accumulation of the weight's gradient over chunks run in float32 whatever the input dtype
    (float64 stays float64); the matmuls run in the inputs' dtype, or autocast's under
    :func:`torch.autocast`. Double backward is not supported.

    Tokens whose label is ``ignore_index`` count for nothing (their hidden states are not read:
    padding may hold anything). Reductions (``N`` = the number of tokens that count):

    - ``"none"``: one value per token, of the hidden states' shape without ``H``; ignored tokens are 0;
    - ``"sum"``: the sum over tokens;
    - ``"batchmean"`` (default): the sum divided by ``N``, the mean over the tokens that count
      (0 when none does).

    Args:
        student_hidden: ``(*, H_s)`` the student's last hidden states (``(N, H_s)`` or ``(B, L, H_s)``).
        student_weight: ``(V, H_s)`` the student's output weight (``lm_head.weight``).
        teacher_hidden: ``(*, H_t)`` the teacher's last hidden states, same leading dims; detached.
        teacher_weight: ``(V, H_t)`` the teacher's output weight; detached.
        labels: optional ``(*)`` next-token labels in ``[0, V)`` or ``ignore_index``: the targets of
            the hard term and the mask of both terms.
        student_bias: optional ``(V,)`` student output bias.
        teacher_bias: optional ``(V,)`` teacher output bias; detached.
        temperature: softening temperature ``T > 0`` of the soft term.
        divergence: ``"forward"`` (default), ``"reverse"``, ``"jsd"`` or ``"tv"``.
        jsd_weight: the teacher's weight in the JSD mixture, in ``(0, 1)``; only with ``divergence="jsd"``
            (default 0.5 there), an error otherwise.
        hard_weight: weight of the cross-entropy with ``labels`` (default 0: no hard term).
        soft_weight: weight of the distillation term (default 1).
        ignore_index: the label value of tokens that do not count (default -100).
        reduction: ``"none" | "sum" | "batchmean"``.
        chunk_size: tokens per chunk; ``None`` picks :func:`default_chunk_size` (512 at V = 32,000
            on the CPU). Any positive value works; it need not divide ``N``.

    Shape:
        hidden states ``(*, H)``, weights ``(V, H)``, biases ``(V,)``, labels ``(*)``; output ``()``,
        or ``(*)`` for ``"none"``.

    Returns:
        A float32 (float64 for float64 inputs) scalar, or the per-token losses for ``"none"``.

    Raises:
        TypeError: non-floating hidden states, weights or biases; a hidden state and its weight of
            different dtypes outside autocast; non-integer ``labels``; a non-int ``ignore_index``.
        ShapeError: hidden states with different leading dims, a weight whose width is not the hidden
            size, student and teacher vocabularies of different sizes, a bias that is not ``(V,)``,
            ``labels`` not matching the tokens.
        ValueError: ``temperature`` not > 0, an unknown ``divergence`` or ``reduction``, ``jsd_weight`` outside
            ``(0, 1)`` or without ``"jsd"``, a negative or non-finite weight, both weights 0,
            ``hard_weight > 0`` without labels, ``chunk_size`` not a positive int, tensors on different
            devices, or (CPU tensors outside ``torch.compile``) a label outside ``[0, V)``.

    Hinton, Vinyals & Dean, *Distilling the Knowledge in a Neural Network*, 2015; Agarwal et al.,
    *On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes* (GKD, the
    generalised JSD), 2024; Wen et al., *f-Divergence Minimization for Sequence-Level Knowledge
    Distillation* (total variation), 2023.

    Example:
        >>> import torch
        >>> from kdloss.functional import fused_linear_kd
        >>> _ = torch.manual_seed(0)
        >>> h_s, w_s = torch.randn(6, 4, requires_grad=True), torch.randn(10, 4, requires_grad=True)
        >>> h_t, w_t = torch.randn(6, 8), torch.randn(10, 8)
        >>> loss = fused_linear_kd(h_s, w_s, h_t, w_t, temperature=2.0, chunk_size=4)
        >>> naive = torch.nn.functional.kl_div(
        ...     (h_s @ w_s.T / 2).log_softmax(-1), (h_t @ w_t.T / 2).log_softmax(-1),
        ...     log_target=True, reduction="batchmean") * 4
        >>> torch.allclose(loss, naive)
        True
        >>> loss.backward()
        >>> w_s.grad.shape
        torch.Size([10, 4])
    """
    check_float("student_hidden", student_hidden)
    check_float("student_weight", student_weight)
    check_float("teacher_hidden", teacher_hidden)
    check_float("teacher_weight", teacher_weight)
    if student_hidden.ndim < 2 or teacher_hidden.ndim < 2:
        bad = "student_hidden" if student_hidden.ndim < 2 else "teacher_hidden"
        shape = student_hidden.shape if bad == "student_hidden" else teacher_hidden.shape
        raise ShapeError(f"{bad} must have at least 2 dimensions, (N, H) or (B, L, H), got shape {tuple(shape)}")
    rows_shape = student_hidden.shape[:-1]
    if teacher_hidden.shape[:-1] != rows_shape:
        raise ShapeError(
            "student_hidden and teacher_hidden must have the same leading (token) dimensions, got "
            f"{tuple(student_hidden.shape)} and {tuple(teacher_hidden.shape)}"
        )
    for name, wt_, hid in (
        ("student_weight", student_weight, student_hidden),
        ("teacher_weight", teacher_weight, teacher_hidden),
    ):
        if wt_.ndim != 2 or wt_.shape[1] != hid.shape[-1]:
            side = name.split("_")[0]
            raise ShapeError(
                f"{name} must have shape (V, H) with H = {side}_hidden's last dimension {hid.shape[-1]}, "
                f"got {tuple(wt_.shape)}"
            )
    vocab = student_weight.shape[0]
    if teacher_weight.shape[0] != vocab:
        raise ShapeError(
            "student_weight and teacher_weight must have the same vocabulary size (first dimension), got "
            f"{tuple(student_weight.shape)} and {tuple(teacher_weight.shape)}"
        )
    device = student_hidden.device
    named: dict[str, Tensor] = {
        "student_weight": student_weight,
        "teacher_hidden": teacher_hidden,
        "teacher_weight": teacher_weight,
    }
    for name, bias in (("student_bias", student_bias), ("teacher_bias", teacher_bias)):
        if bias is not None:
            check_float(name, bias)
            if bias.shape != (vocab,):
                raise ShapeError(f"{name} must have shape (V,) = ({vocab},), got {tuple(bias.shape)}")
            named[name] = bias
    for name, x in named.items():
        if x.device != device:
            raise ValueError(f"student_hidden and {name} must be on the same device, got {device} and {x.device}")
    check_positive("temperature", temperature)
    jsd_beta = check_divergence(divergence, jsd_weight)
    check_reduction(reduction, LM_REDUCTIONS)
    check_int("ignore_index", ignore_index)
    hw, sw = _check_weights(hard_weight, soft_weight, labels)
    chunk = check_positive_int("chunk_size", chunk_size, allow_none=True)
    all_count = False
    if labels is not None:
        all_count = _check_labels(labels, rows_shape, device, vocab, ignore_index)
    mm_s = _matmul_dtype("student_hidden", student_hidden, "student_weight", student_weight)
    mm_t = _matmul_dtype("teacher_hidden", teacher_hidden, "teacher_weight", teacher_weight)

    h = _rows(student_hidden, student_hidden.shape[-1])
    ht = _rows(detached(teacher_hidden), teacher_hidden.shape[-1])
    valid: Tensor | None = None
    count: Tensor | None = None
    y: Tensor | None = None
    if labels is not None:
        flat = labels if labels.ndim == 1 else labels.reshape(-1)
        if all_count:  # every token counts (checked on the host): no mask, no count
            if hw > 0.0:
                y = flat.long()
        else:
            valid = flat != ignore_index
            count = valid.sum()
            if hw > 0.0:
                y = torch.where(valid, flat, 0).long()
    grad_on = torch.is_grad_enabled()
    need = (
        grad_on and student_hidden.requires_grad,
        grad_on and student_weight.requires_grad,
        grad_on and student_bias is not None and student_bias.requires_grad,
    )
    cfg = _Config(
        temperature=float(temperature),
        divergence=divergence,
        beta=jsd_beta,
        hard_weight=hw,
        soft_weight=sw,
        chunk_size=chunk if chunk is not None else default_chunk_size(vocab, device),
        reduction=reduction,
        mm_dtype=mm_s,
        mm_dtype_t=mm_t,
        cdtype=compute_dtype(student_hidden, student_weight, teacher_hidden, teacher_weight),
        need=need,
    )
    out: Tensor = _FusedLinearKD.apply(
        h,
        student_weight,
        student_bias,
        ht,
        teacher_weight.detach(),
        teacher_bias.detach() if teacher_bias is not None else None,
        y,
        valid,
        count,
        cfg,
    )
    return out.reshape(rows_shape) if reduction == "none" else out


# ------------------------------------------------------------------------------- sparse (top-k) teachers


def sparse_kd(
    student_logits: Tensor,
    teacher_logprobs: Tensor,
    teacher_indices: Tensor,
    *,
    teacher_tail: Tensor | None = None,
    labels: Tensor | None = None,
    temperature: float = 1.0,
    divergence: Divergence = "forward",
    jsd_weight: float | None = None,
    hard_weight: float = 0.0,
    soft_weight: float = 1.0,
    ignore_index: int = -100,
    reduction: Reduction = "batchmean",
) -> Tensor:
    r"""Distillation from a sparse teacher: its top-k log-probabilities per token, plus the tail mass.

    The teacher of one token is given by the classes :math:`S` (``teacher_indices``, ``k`` distinct
    classes) and their log-probabilities :math:`\log p_i` (``teacher_logprobs``, at temperature 1,
    as :class:`kdloss.TeacherTopK` stores them), and optionally the probability mass outside them,
    :math:`p_{\text{tail}} = 1 - \sum_{i \in S} p_i` (``teacher_tail``). Both distributions are
    compared on ``k + 1`` outcomes: the ``k`` classes and "any other class". With
    :math:`q = \mathrm{softmax}(s / T)` over the full vocabulary, the student's outcomes are
    :math:`q_i` for :math:`i \in S` and :math:`q_{\text{tail}} = \sum_{c \notin S} q_c`; the
    teacher's are

    - with ``teacher_tail`` (``temperature`` must be 1): :math:`p_i` and :math:`p_{\text{tail}}`;
    - without: the top-k renormalised at temperature ``T``, :math:`\tilde p_i = \mathrm{softmax}_{i
      \in S}(\log p_i / T)`, and a tail of 0.

    The loss of a token is ``soft_weight * T**2 * D(p, q) + hard_weight * CE(s, y)`` with ``D`` the
    ``divergence`` on those ``k + 1`` outcomes (see :func:`fused_linear_kd` for the four
    formulas) and the cross-entropy at temperature 1 on the raw logits. Without a tail the forward
    KL is the usual top-k KD, :math:`\sum_{i \in S} \tilde p_i (\log \tilde p_i - \log q_i)`; with
    it, a lower bound of the full KL that is exact when the tail is 0. The reverse KL needs the
    tail (a teacher with no mass outside S makes it infinite). The teacher's top-k at a
    temperature other than 1 cannot give the softened tail, hence the restriction.

    Reductions as :func:`fused_linear_kd`: ``"none"``, ``"sum"``, ``"batchmean"`` (the mean over the
    tokens whose label is not ``ignore_index``; every token without ``labels``).

    Args:
        student_logits: ``(*, V)`` the student's logits (any leading dims).
        teacher_logprobs: ``(*, k)`` the teacher's log-probabilities of its top-k classes; detached.
        teacher_indices: ``(*, k)`` integer classes in ``[0, V)``, distinct within a token.
        teacher_tail: optional ``(*)`` teacher mass outside the top-k, in ``[0, 1]``; detached.
        labels: optional ``(*)`` labels in ``[0, V)`` or ``ignore_index``: the hard term's targets and the mask.
        temperature: softening temperature ``T > 0``; must be 1 with ``teacher_tail``.
        divergence: ``"forward"`` (default), ``"reverse"`` (needs ``teacher_tail``), ``"jsd"`` or ``"tv"``.
        jsd_weight: the teacher's weight in the JSD mixture, in ``(0, 1)``; only with ``divergence="jsd"``.
        hard_weight: weight of the cross-entropy with ``labels`` (default 0).
        soft_weight: weight of the distillation term (default 1).
        ignore_index: the label value of tokens that do not count (default -100).
        reduction: ``"none" | "sum" | "batchmean"``.

    Shape:
        ``student_logits (*, V)``, ``teacher_logprobs`` and ``teacher_indices (*, k)``, ``teacher_tail``
        and ``labels (*)``; output ``()``, or ``(*)`` for ``"none"``.

    Returns:
        A float32 (float64 for float64 input) scalar, or the per-token losses for ``"none"``.

    Raises:
        TypeError: non-floating logits, log-probabilities or tail; non-integer indices or labels.
        ShapeError: logits with fewer than 2 dims; log-probabilities and indices of different shapes or
            leading dims other than the logits'; ``k > V``; a tail or labels not matching the tokens.
        ValueError: ``temperature`` not > 0, or not 1 with a tail; ``"reverse"`` without a tail; an
            unknown ``divergence``/``reduction``; bad ``jsd_weight`` or weights; different devices; and, for
            CPU tensors outside ``torch.compile``, indices outside ``[0, V)`` or repeated within a
            token, or labels outside ``[0, V)``.

    Example:
        >>> import torch
        >>> from kdloss.functional import sparse_kd
        >>> teacher = torch.tensor([[4.0, 2.0, 0.0, -1.0]]).log_softmax(-1)
        >>> lp, idx = teacher.topk(2)
        >>> tail = 1 - lp.exp().sum(-1)
        >>> student = torch.tensor([[3.0, 1.0, 0.5, 0.0]])
        >>> sparse_kd(student, lp, idx, teacher_tail=tail)  # a lower bound of the full KL
        tensor(0.0522)
        >>> sparse_kd(student, *teacher.topk(4))  # k = V: the full KL, soft_kl(student, teacher)
        tensor(0.0528)
    """
    check_float("student_logits", student_logits)
    check_float("teacher_logprobs", teacher_logprobs)
    check_integer("teacher_indices", teacher_indices)
    if student_logits.ndim < 2:
        raise ShapeError(
            f"student_logits must have at least 2 dimensions, (N, V) or (B, L, V), got {tuple(student_logits.shape)}"
        )
    rows_shape, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    if teacher_logprobs.shape != teacher_indices.shape:
        raise ShapeError(
            "teacher_logprobs and teacher_indices must have the same shape (*, k), got "
            f"{tuple(teacher_logprobs.shape)} and {tuple(teacher_indices.shape)}"
        )
    if teacher_logprobs.ndim != student_logits.ndim or teacher_logprobs.shape[:-1] != rows_shape:
        raise ShapeError(
            f"teacher_logprobs must have shape (*, k) with * = student_logits' leading dims {tuple(rows_shape)}, "
            f"got {tuple(teacher_logprobs.shape)}"
        )
    k = teacher_logprobs.shape[-1]
    if not 1 <= k <= vocab:
        raise ShapeError(f"the teacher's k must lie in [1, V] = [1, {vocab}], got k = {k}")
    if k == vocab and teacher_tail is not None:
        raise ValueError(f"k = V = {vocab}: the top-k is the whole vocabulary and has no tail; pass teacher_tail=None")
    device = student_logits.device
    for name, x in (("teacher_logprobs", teacher_logprobs), ("teacher_indices", teacher_indices)):
        if x.device != device:
            raise ValueError(f"student_logits and {name} must be on the same device, got {device} and {x.device}")
    if teacher_tail is not None:
        check_float("teacher_tail", teacher_tail)
        if teacher_tail.shape != rows_shape:
            raise ShapeError(
                f"teacher_tail must have the logits' shape without V, {tuple(rows_shape)}, "
                f"got {tuple(teacher_tail.shape)}"
            )
        if teacher_tail.device != device:
            raise ValueError(
                f"student_logits and teacher_tail must be on the same device, got {device} and {teacher_tail.device}"
            )
    check_positive("temperature", temperature)
    jsd_beta = check_divergence(divergence, jsd_weight)
    if teacher_tail is not None and temperature != 1.0:
        raise ValueError(
            f"teacher_tail is the mass outside the top-k at temperature 1 and cannot be softened: with "
            f"temperature={temperature} pass teacher_tail=None (the top-k renormalised at T) or use temperature=1"
        )
    if divergence == "reverse" and teacher_tail is None:
        raise ValueError(
            "divergence='reverse' needs teacher_tail: without it the teacher has no mass outside its top-k "
            "and KL(q || p) is infinite wherever the student has some"
        )
    check_reduction(reduction, LM_REDUCTIONS)
    check_int("ignore_index", ignore_index)
    hw, sw = _check_weights(hard_weight, soft_weight, labels)
    if labels is not None:
        _check_labels(labels, rows_shape, device, vocab, ignore_index)
    if teacher_indices.device.type == "cpu" and teacher_indices.numel() > 0 and not torch.compiler.is_compiling():
        lo_hi = torch.aminmax(teacher_indices)
        lo, hi = int(lo_hi[0]), int(lo_hi[1])
        if lo < 0 or hi >= vocab:
            raise ValueError(f"teacher_indices must lie in [0, {vocab}) (V = {vocab}), got values in [{lo}, {hi}]")
        if k > 1:
            srt = _rows(teacher_indices, k).sort(dim=-1).values
            if bool((srt[:, 1:] == srt[:, :-1]).any()):
                raise ValueError("teacher_indices must hold k distinct classes per token, got a repeated class")

    cd = compute_dtype(student_logits, teacher_logprobs)
    # (2-D inputs as they are: a reshape to the same shape, a detach of a tensor without grad and a
    # conversion to its own dtype are each a dispatched operator)
    s = _rows(student_logits, vocab).to(cd)
    idx = _rows(teacher_indices, k).long()
    lp_t = _rows(detached(teacher_logprobs), k).to(cd)
    valid: Tensor | None = None
    if labels is not None:
        flat = labels.reshape(-1)
        valid = flat != ignore_index
        keep = valid.unsqueeze(1)
        s = torch.where(keep, s, 0.0)  # rows that do not count: no NaN from them
        lp_t = torch.where(keep, lp_t, 0.0)
    per_row: Tensor | None = None
    if sw > 0.0:
        T = float(temperature)
        log_q = F.log_softmax(s / T if T != 1.0 else s, dim=-1)
        log_q_s = log_q.gather(1, idx)
        if teacher_tail is None:
            log_p = F.log_softmax(lp_t / T, dim=-1)
            log_p_tail: Tensor | None = None
        else:
            log_p = lp_t
            tail = detached(teacher_tail).reshape(-1).to(cd)
            tail = torch.where(valid, tail, 0.0) if valid is not None else tail
            log_p_tail = tail.clamp(min=0).log()  # a tail of 0 (or rounded below it): log 0 = -inf
        if k < vocab and not (divergence == "forward" and log_p_tail is None):
            # (the forward KL of a teacher without tail: that bucket's term is p_tail log(...) = 0)
            # log of the student's mass outside S, from the logits themselves (no 1 - sum cancellation)
            log_q_tail = log_q.scatter(1, idx, float("-inf")).logsumexp(dim=-1)
            if log_p_tail is None:
                log_p_tail = torch.full_like(log_q_tail, float("-inf"))
            log_p = torch.cat([log_p, log_p_tail.unsqueeze(1)], dim=1)
            log_q_s = torch.cat([log_q_s, log_q_tail.unsqueeze(1)], dim=1)
        div = _bucket_divergence(log_p, log_q_s, divergence, jsd_beta)
        per_row = (sw * T * T) * div
    if hw > 0.0:
        assert labels is not None
        assert valid is not None
        ce = F.cross_entropy(s, torch.where(valid, labels.reshape(-1), 0).long(), reduction="none")
        per_row = hw * ce if per_row is None else per_row + hw * ce
    assert per_row is not None
    if valid is not None:
        per_row = torch.where(valid, per_row, 0.0)
    if reduction == "none":
        return per_row.reshape(rows_shape)
    if reduction == "batchmean" and valid is None and per_row.shape[0] > 0:
        return per_row.mean()  # every token counts
    total = per_row.sum()
    if reduction == "sum" or valid is None:  # (batchmean of no token: 0)
        return total
    return total / valid.sum().clamp(min=1).to(total.dtype)


def _rows(x: Tensor, width: int) -> Tensor:
    """``x`` as ``(N, width)`` rows (itself when it is already 2-D)."""
    return x if x.ndim == 2 else x.reshape(-1, width)


def _xlogy_ratio(log_a: Tensor, log_b: Tensor) -> Tensor:
    """``a * (log a - log b)`` elementwise, 0 where ``a = 0`` (also when ``log b = -inf``)."""
    a = log_a.exp()
    # where a = 0 the product is NaN (-inf * 0) or 0 and is replaced by 0, its gradient there 0 too; a NaN
    # stays NaN (it is not a probability of 0)
    return torch.where(a == 0, 0.0, a * (log_a - log_b))


def _bucket_divergence(log_p: Tensor, log_q: Tensor, divergence: str, beta: float) -> Tensor:
    """The divergence of two distributions given as log-probabilities over the last dim (``-inf`` allowed)."""
    if divergence == "forward":
        return _xlogy_ratio(log_p, log_q).sum(dim=-1)
    if divergence == "reverse":
        return _xlogy_ratio(log_q, log_p).sum(dim=-1)
    if divergence == "jsd":
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
        return beta * _xlogy_ratio(log_p, log_m).sum(dim=-1) + (1.0 - beta) * _xlogy_ratio(log_q, log_m).sum(dim=-1)
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(dim=-1)
