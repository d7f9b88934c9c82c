"""The fused cohort op behind :func:`kdloss.functional.cohort_kd`: K teachers against one student, one launch.

Its Triton source is :mod:`kdloss.kernels._cohort_triton` (imported only when a launch happens).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from kdloss.kernels._common import next_power_of_2

__all__ = ["fused_cohort_rows"]


def cohort_block(c: int, kb: int) -> int:
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
        from kdloss.kernels._cohort_triton import cohort_rows_kernel

        k, rows, c = t.shape
        total = torch.empty(rows, device=s.device, dtype=torch.float32)
        kd = torch.empty((k, rows), device=s.device, dtype=torch.float32)
        ce = torch.empty(rows, device=s.device, dtype=torch.float32)
        grad = torch.empty((rows, c) if write_grad else (1, 1), device=s.device, dtype=s.dtype)
        kb = max(next_power_of_2(k), 1)
        if rows > 0:
            cohort_rows_kernel[(rows,)](
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
                "for retain_graph=True / double backward set KDLOSS_KERNELS=off to use the eager path"
            )
        ctx.grad = None  # type: ignore[attr-defined]
        grad.mul_(grad_total.unsqueeze(-1))
        return grad, None, None, None, None, None, None, None, None


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
    block = block_size if block_size is not None else cohort_block(t.shape[-1], next_power_of_2(k))
    write_grad = torch.is_grad_enabled() and student_logits.requires_grad
    w = kl_weights.to(device=s.device, dtype=torch.float32).contiguous()
    total, kd, ce = _FusedCohort.apply(
        s, t, w, labels.contiguous(), temperature, ce_weight, ignore_index, block, write_grad
    )
    return total, kd, ce
