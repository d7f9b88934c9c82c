"""The fused soft-KL (+ cross-entropy) op behind ``soft_kl`` and ``kd_ce_loss`` of :mod:`kdloss.functional`.

Its Triton source is :mod:`kdloss.kernels._kd_triton` (imported only when a launch happens); here
are the launch helper, the ticket counters of the reducing launch and the ``autograd.Function``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["fused_kd_loss", "fused_kd_rows"]


def column_block(c: int) -> int:
    """The kernel's column block for ``c`` classes: a power of two from 16 up to 4096 (wider rows loop).

    Example:
        >>> column_block(100), column_block(128256)
        (128, 4096)
    """
    b = 16
    while b < c and b < 4096:
        b *= 2
    return b


# reduction -> the kernel's REDUCE code (0: per-row losses, 1: sum, 2: divided by the count)
_REDUCE_CODES = {"none": 0, "sum": 1, "mean": 2, "batchmean": 2}
REDUCE_BLOCK = 1024
"""Rows the reducing launch's last program sums per step (it loops for more rows)."""
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
        from kdloss.kernels._kd_triton import kd_rows_kernel

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
            kd_rows_kernel[(rows,)](
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
                RBLOCK=REDUCE_BLOCK,
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
                "for retain_graph=True / double backward set KDLOSS_KERNELS=off to use the eager path"
            )
        ctx.grad = None  # type: ignore[attr-defined]
        scale: Tensor | None = ctx.scale  # type: ignore[attr-defined]
        grad.mul_(grad_loss.unsqueeze(-1) if scale is None else grad_loss * scale)
        return (grad, *([None] * 11))


def _prepare_rows(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None, mask: Tensor | None, ce_weight: float
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    c = student_logits.shape[-1]
    # (reshape and detach are dispatched operators: skipped where they would change nothing)
    s2 = student_logits if student_logits.ndim == 2 else student_logits.reshape(-1, c)
    t2 = teacher_logits.detach() if teacher_logits.requires_grad else teacher_logits
    t2 = t2 if t2.ndim == 2 else t2.reshape(-1, c)
    # Any row stride is read in place; a class stride other than 1 (a transposed view) is copied
    # once, so that the kernel's loads are contiguous and its column offsets cannot overflow int32.
    if s2.stride(1) != 1:
        s2 = s2.contiguous()
    if t2.stride(1) != 1:
        t2 = t2.contiguous()
    # the kernel indexes labels and mask by row: they must be dense
    lab = (labels if labels.ndim == 1 else labels.reshape(-1)).contiguous() if labels is not None else None
    msk = (mask if mask.ndim == 1 else mask.reshape(-1)).contiguous() if mask is not None else None
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
    block = block_size if block_size is not None else column_block(s2.shape[1])
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
