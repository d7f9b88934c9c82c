"""Optional fused GPU kernels (Triton) behind the soft-KL, cohort and attention-transfer losses.

The functional API dispatches here by itself; users do not call the fused functions directly.
One module per fused op (:mod:`~kdloss.kernels.soft_kl`, :mod:`~kdloss.kernels.cohort`,
:mod:`~kdloss.kernels.attention`: the launch helper and ``autograd.Function``; the Triton source
in a private ``_*_triton`` module), the dispatch gate in ``_dispatch`` and the kernels' self-check
in ``_selfcheck``.

Nothing here imports Triton until a fused kernel is considered, so ``import kdloss`` works
without Triton and CPU code never touches it.

The environment variable ``KDLOSS_KERNELS`` (read at every call) chooses the mode: ``verify``
(default: a kernel is used on a device and dtype once its self-check has passed there, checked at
the first call in the process), ``on`` (used without the check) or ``off`` (never used);
:func:`set_kernels_mode` and :func:`set_kernels_enabled` set it in code, :func:`status` says per
key whether the fused path is in use and why, :func:`verify` runs the check ahead of time.
``KDLOSS_DISABLE_KERNELS=1`` still means ``off`` (deprecated).
"""

from __future__ import annotations

from kdloss.kernels._dispatch import (
    KERNELS,
    KernelFallbackWarning,
    KernelName,
    KernelsMode,
    KernelStatus,
    kernels_available,
    kernels_enabled,
    kernels_mode,
    run_guarded,
    set_kernels_enabled,
    set_kernels_mode,
    status,
    use_fused,
    verify,
)
from kdloss.kernels.attention import attention_fusable, fused_attention_rows
from kdloss.kernels.cohort import fused_cohort_rows
from kdloss.kernels.soft_kl import fused_kd_loss, fused_kd_rows

__all__ = [
    "KERNELS",
    "KernelFallbackWarning",
    "KernelName",
    "KernelStatus",
    "KernelsMode",
    "attention_fusable",
    "fused_attention_rows",
    "fused_cohort_rows",
    "fused_kd_loss",
    "fused_kd_rows",
    "kernels_available",
    "kernels_enabled",
    "kernels_mode",
    "run_guarded",
    "set_kernels_enabled",
    "set_kernels_mode",
    "status",
    "use_fused",
    "verify",
]
