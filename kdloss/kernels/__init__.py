"""Optional fused GPU kernels (Triton) behind the soft-KL losses of :mod:`kdloss.functional`.

Nothing here imports Triton until a fused kernel is actually launched, so ``import kdloss`` works
without Triton and CPU code never touches it. The functional API dispatches here by itself (see
:func:`use_fused`); users do not call these functions directly.

Set the environment variable ``KDLOSS_DISABLE_KERNELS=1`` (read at every call) or use
:func:`set_kernels_enabled` to force the eager PyTorch path everywhere.
"""

from __future__ import annotations

import importlib
import os

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    "attention_fusable",
    "fused_attention_rows",
    "fused_cohort_rows",
    "fused_kd_loss",
    "fused_kd_rows",
    "kernels_available",
    "kernels_enabled",
    "set_kernels_enabled",
    "use_fused",
]

_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_triton_ok: bool | None = None
_enabled = True


def kernels_available() -> bool:
    """Whether Triton can be imported (checked once, on the first call)."""
    global _triton_ok
    if _triton_ok is None:
        try:
            importlib.import_module("triton")
        except Exception:  # ImportError, or a broken install
            _triton_ok = False
        else:
            _triton_ok = True
    return _triton_ok


def set_kernels_enabled(enabled: bool) -> None:
    """Allow (``True``, the default) or forbid (``False``) the fused kernels process-wide.

    Example:
        >>> from kdloss.kernels import kernels_enabled, set_kernels_enabled
        >>> set_kernels_enabled(False); kernels_enabled()
        False
        >>> set_kernels_enabled(True)
    """
    global _enabled
    _enabled = bool(enabled)


def kernels_enabled() -> bool:
    """``False`` if :func:`set_kernels_enabled` turned the kernels off or ``KDLOSS_DISABLE_KERNELS`` is set (not 0)."""
    return _enabled and os.environ.get("KDLOSS_DISABLE_KERNELS", "0") in ("", "0")


def use_fused(student_logits: Tensor, teacher_logits: Tensor) -> bool:
    """Whether a soft-KL call on these (already validated) logits takes the fused kernel.

    True only on CUDA, for float32/bfloat16/float16 logits, outside ``torch.compile`` tracing
    (the compiler fuses the eager path itself), when the kernels are enabled and Triton imports.

    Example:
        >>> import torch
        >>> use_fused(torch.zeros(2, 3), torch.zeros(2, 3))  # CPU: always the eager path
        False
    """
    return (
        not torch.compiler.is_compiling()  # first: under dynamo this folds to False before anything else is traced
        and student_logits.is_cuda
        and student_logits.dtype in _FUSED_DTYPES
        and teacher_logits.dtype in _FUSED_DTYPES
        and kernels_enabled()
        and kernels_available()
    )


def _block_size(c: int) -> int:
    b = 16
    while b < c and b < 4096:
        b *= 2
    return b


# reduction -> the kernel's REDUCE code (0: per-row losses, 1: sum, 2: divided by the count)
_REDUCE_CODES = {"none": 0, "sum": 1, "mean": 2, "batchmean": 2}
_REDUCE_BLOCK = 1024
# The ticket counters of the reducing launch, one per (device, stream): each launch's last program
# resets its counter to 0, so one zeroed int32 serves every later launch on that stream.
_counters: dict[tuple[str, int, int], Tensor] = {}


def _ticket_counter(device: torch.device) -> Tensor:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        key = ("cuda", index, torch.cuda.current_stream(device).cuda_stream)
        capturing = torch.cuda.is_current_stream_capturing()
    else:  # CPU tensors under the Triton interpreter (tests): one counter, reused like on CUDA
        key, capturing = (device.type, 0, 0), False
    counter = _counters.get(key)
    if counter is None:
        counter = torch.zeros(1, dtype=torch.int32, device=device)
        if not capturing:  # memory from a CUDA graph's private pool is not kept
            _counters[key] = counter
    return counter


class _FusedKD(torch.autograd.Function):
    """``kl_weight * KL + ce_weight * CE`` per row, or reduced over the rows, with the gradient.

    The gradient is computed in the forward pass; the backward only scales the saved gradient in
    place (by the incoming per-row gradient, or by the incoming scalar times ``1 / denominator``
    for a reduced loss), so the extra memory is one gradient-sized buffer. It can therefore run
    once: a second backward through the same graph (``retain_graph=True``) raises instead of
    returning a wrong result.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        s2: Tensor,
        t2: Tensor,
        labels: Tensor | None,
        mask: Tensor | None,
        temperature: float,
        kl_weight: float,
        ce_weight: float,
        ignore_index: int,
        block: int,
        write_grad: bool,
        reduction: str,
        elements_per_row: int,
    ) -> tuple[Tensor, Tensor]:
        from kdloss.kernels._kd_triton import _kd_rows_kernel

        rows, c = s2.shape
        reduce = _REDUCE_CODES[reduction]
        loss = torch.empty(rows, device=s2.device, dtype=torch.float32)
        valid = torch.empty(rows, device=s2.device, dtype=torch.bool)
        grad = torch.empty((rows, c) if write_grad else (1, 1), device=s2.device, dtype=s2.dtype)
        out = torch.empty((), device=s2.device, dtype=torch.float32) if reduce else loss
        scale = torch.empty((), device=s2.device, dtype=torch.float32) if reduce else loss
        if rows == 0 and reduce:
            out.zero_()  # an empty batch: 0, never NaN (and nothing to scale)
            scale.zero_()
        if rows > 0:
            _kd_rows_kernel[(rows,)](
                s2,
                t2,
                labels if labels is not None else loss,
                mask if mask is not None else loss,
                loss,
                valid,
                grad,
                s2.stride(0),
                s2.stride(1),
                t2.stride(0),
                t2.stride(1),
                grad.stride(0),
                c,
                float(temperature),
                float(kl_weight * temperature**2),
                float(kl_weight * temperature),
                float(ce_weight),
                int(ignore_index),
                out,
                scale,
                _ticket_counter(s2.device) if reduce else loss,
                rows,
                float(elements_per_row if reduction == "mean" else 1),
                HAS_MASK=mask is not None,
                HAS_LABELS=labels is not None,
                HAS_CE=ce_weight != 0.0,
                WRITE_GRAD=write_grad,
                BLOCK=block,
                REDUCE=reduce,
                RBLOCK=_REDUCE_BLOCK,
                num_warps=4 if block <= 1024 else 8,
                enable_fp_fusion=True,  # explicit: Triton 3.9 warns when it is left to the default
            )
        ctx.grad = grad if write_grad else None  # type: ignore[attr-defined]
        ctx.scale = scale if reduce else None  # type: ignore[attr-defined]
        ctx.mark_non_differentiable(valid)
        return out, valid

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_loss: Tensor, _grad_valid: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        grad: Tensor | None = ctx.grad  # type: ignore[attr-defined]
        if grad is None:
            raise RuntimeError(
                "the fused soft-KL backward can run only once per forward (its gradient is scaled in place); "
                "for retain_graph=True / double backward set KDLOSS_DISABLE_KERNELS=1 to use the eager path"
            )
        ctx.grad = None  # type: ignore[attr-defined]
        scale: Tensor | None = ctx.scale  # type: ignore[attr-defined]
        grad.mul_(grad_loss.unsqueeze(-1) if scale is None else grad_loss * scale)
        return (grad, *([None] * 11))


def _prepare_rows(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None, mask: Tensor | None, ce_weight: float
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    c = student_logits.shape[-1]
    s2 = student_logits.reshape(-1, c)
    t2 = teacher_logits.detach().reshape(-1, c)
    # Any row stride is read in place; a class stride other than 1 (a transposed view) is copied
    # once, so that the kernel's loads are contiguous and its column offsets cannot overflow int32.
    if s2.stride(1) != 1:
        s2 = s2.contiguous()
    if t2.stride(1) != 1:
        t2 = t2.contiguous()
    # the kernel indexes labels and mask by row: they must be dense
    lab = labels.reshape(-1).contiguous() if labels is not None else None
    msk = mask.reshape(-1).contiguous() if mask is not None else None
    if ce_weight != 0.0 and lab is None:
        raise ValueError("ce_weight != 0 needs labels")
    return s2, t2, lab, msk


def _run_fused_kd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float,
    mask: Tensor | None,
    labels: Tensor | None,
    ignore_index: int,
    kl_weight: float,
    ce_weight: float,
    block_size: int | None,
    reduction: str,
    elements_per_row: int,
) -> tuple[Tensor, Tensor]:
    """Prepare the rows and launch the kernel once: ``(per-row losses or the reduced loss, valid rows)``."""
    s2, t2, lab, msk = _prepare_rows(student_logits, teacher_logits, labels, mask, ce_weight)
    block = block_size if block_size is not None else _block_size(s2.shape[1])
    # needs_input_grad cannot tell inside forward whether grad mode is on: decide here
    write_grad = torch.is_grad_enabled() and student_logits.requires_grad
    args = (temperature, kl_weight, ce_weight, ignore_index, block, write_grad, reduction, elements_per_row)
    out: tuple[Tensor, Tensor] = _FusedKD.apply(s2, t2, lab, msk, *args)
    return out


def fused_kd_rows(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    ignore_index: int = -100,
    kl_weight: float = 1.0,
    ce_weight: float = 0.0,
    block_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-row ``kl_weight * T^2 * KL(p_t || q_s) + ce_weight * CE(s, labels)`` and the rows that count.

    Arguments are assumed validated (by :func:`kdloss.functional.soft_kl` or
    :func:`kdloss.functional.kd_ce_loss`). Runs on whatever device Triton can launch on (CUDA, or
    CPU tensors under ``TRITON_INTERPRET=1``).

    Returns:
        ``(loss, valid)``: float32 per-row losses (0 where the row does not count) and a bool
        tensor of the rows that count, both of the logits' shape without the class dimension.
    """
    rows_shape = student_logits.shape[:-1]
    loss, valid = _run_fused_kd(
        student_logits,
        teacher_logits,
        temperature=temperature,
        mask=mask,
        labels=labels,
        ignore_index=ignore_index,
        kl_weight=kl_weight,
        ce_weight=ce_weight,
        block_size=block_size,
        reduction="none",
        elements_per_row=1,
    )
    return loss.reshape(rows_shape), valid.reshape(rows_shape)


def fused_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float,
    reduction: str,
    elements_per_row: int = 1,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    ignore_index: int = -100,
    kl_weight: float = 1.0,
    ce_weight: float = 0.0,
    block_size: int | None = None,
) -> Tensor:
    """:func:`fused_kd_rows` reduced over the rows in the same single launch: a 0-d float32 tensor.

    ``reduction``: ``"sum"``; ``"batchmean"`` divides by the rows that count, ``"mean"`` by
    those times ``elements_per_row``; no row counting gives 0 (never NaN). ``"none"`` returns
    :func:`fused_kd_rows`'s per-row losses. Same assumptions as :func:`fused_kd_rows`.
    """
    if reduction not in _REDUCE_CODES:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, _REDUCE_CODES))}, got {reduction!r}")
    out, _ = _run_fused_kd(
        student_logits,
        teacher_logits,
        temperature=temperature,
        mask=mask,
        labels=labels,
        ignore_index=ignore_index,
        kl_weight=kl_weight,
        ce_weight=ce_weight,
        block_size=block_size,
        reduction=reduction,
        elements_per_row=elements_per_row,
    )
    return out.reshape(student_logits.shape[:-1]) if reduction == "none" else out


def _cohort_block(c: int, kb: int) -> int:
    """Column block for the cohort kernel: the ``(KB, BLOCK)`` teacher tile stays at most 8192 values."""
    b = 16
    while b < c and b * kb < 8192:
        b *= 2
    return b


class _FusedCohort(torch.autograd.Function):
    """Per-row cohort total; per-teacher KD and CE rows as detached extra outputs.

    As :class:`_FusedKD`, the gradient is computed in the forward pass and the backward scales it
    in place, so the backward can run once.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        s: Tensor,
        t: Tensor,
        kl_weights: Tensor,
        labels: Tensor,
        temperature: float,
        ce_weight: float,
        ignore_index: int,
        block: int,
        write_grad: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        from kdloss.kernels._cohort_triton import _cohort_rows_kernel

        k, rows, c = t.shape
        total = torch.empty(rows, device=s.device, dtype=torch.float32)
        kd = torch.empty((k, rows), device=s.device, dtype=torch.float32)
        ce = torch.empty(rows, device=s.device, dtype=torch.float32)
        grad = torch.empty((rows, c) if write_grad else (1, 1), device=s.device, dtype=s.dtype)
        kb = max(_next_power_of_2(k), 1)
        if rows > 0:
            _cohort_rows_kernel[(rows,)](
                s,
                t,
                kl_weights,
                labels,
                total,
                kd,
                ce,
                grad,
                s.stride(0),
                t.stride(0),
                t.stride(1),
                grad.stride(0),
                kd.stride(0),
                c,
                k,
                float(temperature),
                float(ce_weight),
                int(ignore_index),
                WRITE_GRAD=write_grad,
                KB=kb,
                BLOCK=block,
                num_warps=4 if block * kb <= 2048 else 8,
                enable_fp_fusion=True,
            )
        ctx.grad = grad if write_grad else None  # type: ignore[attr-defined]
        ctx.mark_non_differentiable(kd, ce)
        return total, kd, ce

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_total: Tensor, _gkd: Tensor | None, _gce: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        grad: Tensor | None = ctx.grad  # type: ignore[attr-defined]
        if grad is None:
            raise RuntimeError(
                "the fused cohort backward can run only once per forward (its gradient is scaled in place); "
                "for retain_graph=True / double backward set KDLOSS_DISABLE_KERNELS=1 to use the eager path"
            )
        ctx.grad = None  # type: ignore[attr-defined]
        grad.mul_(grad_total.unsqueeze(-1))
        return grad, None, None, None, None, None, None, None, None


def _next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n`` (``triton.next_power_of_2`` without importing Triton)."""
    return 1 << max(n - 1, 0).bit_length()


def fused_cohort_rows(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    temperature: float,
    kl_weights: Tensor,
    ce_weight: float,
    ignore_index: int = -100,
    block_size: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row ``sum_k kl_weights[k] * T^2 KL(p_k || q) + ce_weight * CE``, with the parts, in one launch.

    Arguments are assumed validated (by :func:`kdloss.functional.cohort_kd`): ``student_logits``
    ``(B, C)``, ``teacher_logits`` ``(K, B, C)`` (detached here), ``labels`` ``(B,)`` (rows labelled
    ``ignore_index`` get CE 0), ``kl_weights`` ``(K,)`` float32 on the logits' device. Runs on
    whatever device Triton can launch on (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``).

    Returns:
        ``(total, kd, ce)`` in float32: the ``(B,)`` totals (differentiable w.r.t. the student),
        the detached, unweighted ``(K, B)`` values ``T^2 KL(p_k || q)`` and the detached ``(B,)``
        cross-entropies.
    """
    s = student_logits if student_logits.stride(-1) == 1 else student_logits.contiguous()
    t = teacher_logits.detach()
    if t.stride(-1) != 1:
        t = t.contiguous()
    k = t.shape[0]
    block = block_size if block_size is not None else _cohort_block(t.shape[-1], _next_power_of_2(k))
    write_grad = torch.is_grad_enabled() and student_logits.requires_grad
    w = kl_weights.to(device=s.device, dtype=torch.float32).contiguous()
    total, kd, ce = _FusedCohort.apply(
        s, t, w, labels.contiguous(), temperature, ce_weight, ignore_index, block, write_grad
    )
    return total, kd, ce


_ATTENTION_MAX_HW = 8192  # positions held in registers per program; larger maps take the eager path
_ATTENTION_EPS = 1e-12  # the eps of F.normalize in kdloss.functional.attention_loss


def attention_fusable(student: list[Tensor], teacher: list[Tensor], p: float) -> bool:
    """Whether :func:`fused_attention_rows` handles these (validated) pairs: ``p = 2``, equal spatial sizes.

    Pairs whose spatial sizes differ (the eager path average-pools their energy maps) and maps with
    more than 8192 positions are left to the eager path, as is every call for which
    :func:`use_fused` says no for some pair.

    Example:
        >>> import torch
        >>> attention_fusable([torch.zeros(2, 3, 4, 4)], [torch.zeros(2, 5, 4, 4)], 2.0)  # CPU
        False
    """
    if p != 2.0 or student[0].shape[0] == 0:
        return False
    for fs, ft in zip(student, teacher):
        if fs.shape[-2:] != ft.shape[-2:] or fs.shape[-2] * fs.shape[-1] > _ATTENTION_MAX_HW:
            return False
        if fs.shape[-2] * fs.shape[-1] == 0 or fs.shape[1] == 0 or ft.shape[1] == 0:
            return False
        if fs.device != student[0].device or not use_fused(fs, ft):  # one launch: one device
            return False
    return True


def _attention_tiles(hw: int) -> tuple[int, int]:
    hwb = max(_next_power_of_2(hw), 16)
    cb = max(1, min(32, 4096 // hwb))
    return cb, hwb


class _FusedAttention(torch.autograd.Function):
    """Per-sample ``beta * sum_j mean_i (a_s - a_t)^2`` over up to 4 pairs: one launch each way."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, beta: float, npairs: int, save: bool, *maps: Tensor
    ) -> Tensor:
        from kdloss.kernels._attention_triton import _attention_fwd_kernel

        s_maps, t_maps = maps[:npairs], maps[npairs:]
        b = s_maps[0].shape[0]
        hw_max = max(f.shape[-2] * f.shape[-1] for f in s_maps)
        cb, hwb = _attention_tiles(hw_max)
        dev = s_maps[0].device
        loss = torch.empty(b, device=dev, dtype=torch.float32)
        n_save = npairs if save else 1
        a_s = torch.empty((n_save, b, hwb if save else 1), device=dev, dtype=torch.float32)
        a_t = torch.empty_like(a_s)
        norm = torch.empty((n_save, b), device=dev, dtype=torch.float32)
        args: list[object] = []
        for j in range(4):
            fs, ft = (s_maps[j], t_maps[j]) if j < npairs else (s_maps[0], t_maps[0])
            args += [
                fs,
                *fs.stride(),
                fs.shape[1],
                ft,
                *ft.stride(),
                ft.shape[1],
                fs.shape[3],
                fs.shape[2] * fs.shape[3],
            ]
        _attention_fwd_kernel[(b,)](
            *args,
            loss,
            a_s,
            a_t,
            norm,
            b,
            float(beta),
            _ATTENTION_EPS,
            NPAIRS=npairs,
            CB=cb,
            HWB=hwb,
            SAVE=save,
            num_warps=4 if cb * hwb <= 2048 else 8,
            enable_fp_fusion=True,
        )
        if save:
            ctx.save_for_backward(a_s, a_t, norm, *s_maps)
        ctx.meta = (beta, npairs, cb, hwb)  # type: ignore[attr-defined]
        return loss

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_loss: Tensor
    ) -> tuple[Tensor | None, ...]:
        from kdloss.kernels._attention_triton import _attention_bwd_kernel

        beta, npairs, cb, hwb = ctx.meta  # type: ignore[attr-defined]
        a_s, a_t, norm, *s_maps = ctx.saved_tensors  # type: ignore[attr-defined]
        grads = [torch.empty_like(f) for f in s_maps]
        b = s_maps[0].shape[0]
        args: list[object] = []
        for j in range(4):
            fs, g = (s_maps[j], grads[j]) if j < npairs else (s_maps[0], grads[0])
            args += [fs, *fs.stride(), fs.shape[1], g, *g.stride(), fs.shape[3], fs.shape[2] * fs.shape[3]]
        _attention_bwd_kernel[(b,)](
            *args,
            grad_loss.contiguous(),
            a_s,
            a_t,
            norm,
            b,
            float(beta),
            _ATTENTION_EPS,
            NPAIRS=npairs,
            CB=cb,
            HWB=hwb,
            num_warps=4 if cb * hwb <= 2048 else 8,
            enable_fp_fusion=True,
        )
        return (None, None, None, *grads, *([None] * npairs))


def fused_attention_rows(student: list[Tensor], teacher: list[Tensor], *, beta: float) -> Tensor:
    """Per-sample attention-transfer loss with ``p = 2``: ``beta * sum_j mean_i (a_s - a_t)^2``, float32 ``(B,)``.

    Arguments are assumed validated by :func:`kdloss.functional.attention_loss` and accepted by
    :func:`attention_fusable` (equal spatial sizes per pair). The teachers are detached. Up to 4
    pairs take one forward launch and one backward launch; more pairs take one per group of 4.
    Runs on whatever device Triton can launch on (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``).
    """
    parts: list[Tensor] = []
    for k in range(0, len(student), 4):
        s = student[k : k + 4]
        t = [f.detach() for f in teacher[k : k + 4]]
        save = torch.is_grad_enabled() and any(f.requires_grad for f in s)
        parts.append(_FusedAttention.apply(float(beta), len(s), save, *s, *t))
    total = parts[0]
    for extra in parts[1:]:
        total = total + extra
    return total
