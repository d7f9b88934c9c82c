"""Module forms of :func:`kdloss.functional.fused_linear_kd` and :func:`kdloss.functional.sparse_kd`."""

from __future__ import annotations

from torch import Tensor, nn

from kdloss._validate import Reduction, check_int, check_positive, check_positive_int, check_reduction
from kdloss.functional.fused_linear import (
    LM_REDUCTIONS,
    Divergence,
    check_divergence,
    check_loss_weights,
    fused_linear_kd,
    sparse_kd,
)

__all__ = ["FusedLinearKDLoss", "SparseKDLoss"]


class _LanguageModelKD(nn.Module):
    """The hyper-parameters both modules take, validated once (when the module is built)."""

    def __init__(
        self,
        temperature: float,
        divergence: Divergence,
        jsd_weight: float | None,
        hard_weight: float,
        soft_weight: float,
        ignore_index: int,
        reduction: Reduction,
    ) -> None:
        super().__init__()
        self.temperature = check_positive("temperature", temperature)
        check_divergence(divergence, jsd_weight)
        self.divergence: Divergence = divergence
        self.jsd_weight = jsd_weight
        self.hard_weight, self.soft_weight = check_loss_weights(hard_weight, soft_weight)
        self.ignore_index = check_int("ignore_index", ignore_index)
        self.reduction: Reduction = check_reduction(reduction, LM_REDUCTIONS)

    def extra_repr(self) -> str:
        s = f"temperature={self.temperature}, divergence={self.divergence!r}"
        if self.jsd_weight is not None:
            s += f", jsd_weight={self.jsd_weight}"
        s += f", hard_weight={self.hard_weight}, soft_weight={self.soft_weight}, reduction={self.reduction!r}"
        if self.ignore_index != -100:
            s += f", ignore_index={self.ignore_index}"
        return s


class FusedLinearKDLoss(_LanguageModelKD):
    """The output projection and the distillation loss of a language model in one chunked call;
    see :func:`kdloss.functional.fused_linear_kd` for the formulas, memory and reductions.

    Holds the hyper-parameters only (validated here, so a bad configuration fails when built); the
    weights are passed to :meth:`forward` (``lm_head.weight`` of each model), so the module never
    owns or copies them.

    Args:
        temperature: softening temperature ``T > 0`` of the soft term.
        divergence: ``"forward"`` (default), ``"reverse"``, ``"jsd"`` or ``"tv"``.
        jsd_weight: the teacher's weight in the JSD mixture, in ``(0, 1)``; only with ``divergence="jsd"``.
        hard_weight: weight of the cross-entropy with the labels (default 0).
        soft_weight: weight of the distillation term (default 1).
        ignore_index: the label value of tokens that do not count (default -100).
        reduction: ``"none" | "sum" | "batchmean"`` (default: the mean over the tokens that count).
        chunk_size: tokens per chunk (``None``: :func:`kdloss.functional.fused_linear.default_chunk_size`).

    Raises:
        TypeError, ValueError: for a bad hyper-parameter, when the module is built; ``forward`` raises
            what the function raises.

    Example:
        >>> import torch
        >>> loss_fn = FusedLinearKDLoss(temperature=2.0, divergence="jsd", hard_weight=0.5)
        >>> loss_fn
        FusedLinearKDLoss(temperature=2.0, divergence='jsd', hard_weight=0.5, soft_weight=1.0, reduction='batchmean')
        >>> student_head, teacher_head = torch.nn.Linear(4, 10, bias=False), torch.nn.Linear(8, 10, bias=False)
        >>> h_s, h_t = torch.randn(2, 3, 4), torch.randn(2, 3, 8)
        >>> labels = torch.tensor([[1, 2, -100], [4, 5, 6]])
        >>> loss = loss_fn(h_s, student_head.weight, h_t, teacher_head.weight, labels)
        >>> loss.backward()
        >>> student_head.weight.grad.shape
        torch.Size([10, 4])
    """

    def __init__(
        self,
        temperature: float = 1.0,
        *,
        divergence: Divergence = "forward",
        jsd_weight: float | None = None,
        hard_weight: float = 0.0,
        soft_weight: float = 1.0,
        ignore_index: int = -100,
        reduction: Reduction = "batchmean",
        chunk_size: int | None = None,
    ) -> None:
        super().__init__(temperature, divergence, jsd_weight, hard_weight, soft_weight, ignore_index, reduction)
        self.chunk_size = check_positive_int("chunk_size", chunk_size, allow_none=True)

    def forward(
        self,
        student_hidden: Tensor,
        student_weight: Tensor,
        teacher_hidden: Tensor,
        teacher_weight: Tensor,
        labels: Tensor | None = None,
        *,
        student_bias: Tensor | None = None,
        teacher_bias: Tensor | None = None,
    ) -> Tensor:
        return fused_linear_kd(
            student_hidden,
            student_weight,
            teacher_hidden,
            teacher_weight,
            labels,
            student_bias=student_bias,
            teacher_bias=teacher_bias,
            temperature=self.temperature,
            divergence=self.divergence,
            jsd_weight=self.jsd_weight,
            hard_weight=self.hard_weight,
            soft_weight=self.soft_weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            chunk_size=self.chunk_size,
        )

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s + (f", chunk_size={self.chunk_size}" if self.chunk_size is not None else "")


class SparseKDLoss(_LanguageModelKD):
    """Distillation from a teacher stored as top-k log-probabilities (and optionally its tail mass);
    see :func:`kdloss.functional.sparse_kd` for the formulas and :class:`kdloss.TeacherTopK` for the store.

    Holds the hyper-parameters only (validated here).

    Args:
        temperature: softening temperature ``T > 0``; must be 1 when the tail mass is given.
        divergence: ``"forward"`` (default), ``"reverse"`` (needs the tail), ``"jsd"`` or ``"tv"``.
        jsd_weight: the teacher's weight in the JSD mixture, in ``(0, 1)``; only with ``divergence="jsd"``.
        hard_weight: weight of the cross-entropy with the labels (default 0).
        soft_weight: weight of the distillation term (default 1).
        ignore_index: the label value of tokens that do not count (default -100).
        reduction: ``"none" | "sum" | "batchmean"``.

    Raises:
        TypeError, ValueError: for a bad hyper-parameter, when the module is built.

    Example:
        >>> import torch
        >>> loss_fn = SparseKDLoss()
        >>> teacher = torch.randn(2, 3, 10).log_softmax(-1)
        >>> logprobs, indices = teacher.topk(4, dim=-1)
        >>> tail = 1 - logprobs.exp().sum(-1)
        >>> student = torch.randn(2, 3, 10, requires_grad=True)
        >>> loss_fn(student, logprobs, indices, teacher_tail=tail).shape
        torch.Size([])
    """

    def __init__(
        self,
        temperature: float = 1.0,
        *,
        divergence: Divergence = "forward",
        jsd_weight: float | None = None,
        hard_weight: float = 0.0,
        soft_weight: float = 1.0,
        ignore_index: int = -100,
        reduction: Reduction = "batchmean",
    ) -> None:
        super().__init__(temperature, divergence, jsd_weight, hard_weight, soft_weight, ignore_index, reduction)

    def forward(
        self,
        student_logits: Tensor,
        teacher_logprobs: Tensor,
        teacher_indices: Tensor,
        *,
        teacher_tail: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> Tensor:
        return sparse_kd(
            student_logits,
            teacher_logprobs,
            teacher_indices,
            teacher_tail=teacher_tail,
            labels=labels,
            temperature=self.temperature,
            divergence=self.divergence,
            jsd_weight=self.jsd_weight,
            hard_weight=self.hard_weight,
            soft_weight=self.soft_weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
        )
