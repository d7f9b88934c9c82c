"""The fused attention-transfer op behind :func:`kdloss.functional.attention_loss` (``p = 2``).

Its Triton source is :mod:`kdloss.kernels._attention_triton` (imported only when a launch
happens). :func:`attention_fusable` is the whole dispatch predicate of this op.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from kdloss.kernels._common import next_power_of_2
from kdloss.kernels._dispatch import use_fused

__all__ = ["attention_fusable", "fused_attention_rows"]


_ATTENTION_MAX_HW = 8192  # positions held in registers per program; larger maps take the eager path
_ATTENTION_EPS = 1e-12  # the eps of F.normalize in kdloss.functional.attention_loss


def attention_fusable(student: list[Tensor], teacher: list[Tensor], p: float) -> bool:
    """Whether :func:`fused_attention_rows` handles these (validated) pairs: ``p = 2``, equal spatial sizes.

    Pairs whose spatial sizes still differ (``pool="maps"``: the eager path average-pools their
    energy maps; ``pool="features"`` resizes the features before this is asked) and maps with
    more than 8192 positions are left to the eager path, as is every call for which
    :func:`kdloss.kernels.use_fused` (``kernel="attention"``: CUDA, dtype, mode, self-check) says
    no for some pair.

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
        if fs.device != student[0].device or not use_fused(fs, ft, kernel="attention"):  # one launch: one device
            return False
    return True


def attention_tiles(hw: int) -> tuple[int, int]:
    """``(CB, HWB)``: channels per step and the positions tile (all ``hw`` positions, a power of two >= 16)."""
    hwb = max(next_power_of_2(hw), 16)
    cb = max(1, min(32, 4096 // hwb))
    return cb, hwb


class _FusedAttention(torch.autograd.Function):
    """Per-sample ``beta * sum_j mean_i (a_s - a_t)^2`` over up to 4 pairs: one launch each way."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, beta: float, npairs: int, save: bool, *maps: Tensor
    ) -> Tensor:
        from kdloss.kernels._attention_triton import attention_fwd_kernel

        s_maps, t_maps = maps[:npairs], maps[npairs:]
        b = s_maps[0].shape[0]
        hw_max = max(f.shape[-2] * f.shape[-1] for f in s_maps)
        cb, hwb = attention_tiles(hw_max)
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
        attention_fwd_kernel[(b,)](
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
        from kdloss.kernels._attention_triton import attention_bwd_kernel

        beta, npairs, cb, hwb = ctx.meta  # type: ignore[attr-defined]
        a_s, a_t, norm, *s_maps = ctx.saved_tensors  # type: ignore[attr-defined]
        grads = [torch.empty_like(f) for f in s_maps]
        b = s_maps[0].shape[0]
        args: list[object] = []
        for j in range(4):
            fs, g = (s_maps[j], grads[j]) if j < npairs else (s_maps[0], grads[0])
            args += [fs, *fs.stride(), fs.shape[1], g, *g.stride(), fs.shape[3], fs.shape[2] * fs.shape[3]]
        attention_bwd_kernel[(b,)](
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
