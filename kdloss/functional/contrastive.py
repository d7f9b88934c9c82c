"""Contrastive representation distillation (CRD, Tian, Krishnan & Isola, ICLR 2020): the stateless parts.

The method is split into pure functions that :class:`kdloss.CRDLoss` and :class:`kdloss.ContrastMemory`
call in order:

1. :func:`crd_embed`: flatten, linear projection, L2 normalisation (one embedding head);
2. :func:`crd_logits`: ``<v, w_j> / tau`` of each anchor against the bank rows it is contrasted
   with (its own index first, then the negatives), in float32, without materialising the
   ``(B, K+1, d)`` gathered rows;
3. :func:`crd_normalizer`: the constant ``Z = mean(exp(logits)) * n_data`` (set once, from the
   first batch, by the memory);
4. :func:`crd_nce_loss`: the NCE loss of one view from its logits and ``Z``; :func:`crd_loss`:
   the CRD loss, both views' NCE losses from their logits and the memory's ``Z``;
5. :func:`crd_memory_update`: the momentum update of the positives' bank rows.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from kdloss._numerics import detached, in_dtype, reduce_loss
from kdloss._validate import (
    Reduction,
    ShapeError,
    check_float,
    check_integer,
    check_ndim,
    check_positive,
    check_positive_int,
    check_reduction,
    check_same_device,
    check_unit_interval,
)
from kdloss.functional._spatial import unit_rows

__all__ = [
    "ScoreMethod",
    "check_index_range",
    "crd_embed",
    "crd_logits",
    "crd_loss",
    "crd_memory_update",
    "crd_nce_loss",
    "crd_normalizer",
    "crd_update_rows",
]

ScoreMethod = Literal["auto", "matmul", "gather"]
"""How :func:`crd_logits` scores anchors against bank rows.

- ``"matmul"``: one ``(B, d) @ (d, n_data)`` product against the whole bank, then a gather of
  the ``K+1`` needed columns. Reads the bank once; ``B * n_data`` float32 scores are kept.
- ``"gather"``: a chunked gather-dot: ``chunk_size`` columns at a time, the rows are gathered
  and dotted with the anchor, the backward pass gathers them again (a custom autograd
  function), so at most ``(B, chunk_size, d)`` is ever held.
- ``"auto"``: ``"matmul"`` when ``B * (K+1) >= n_data / 2`` (the crossover measured on CPU, see
  ``docs/crd.md``), else ``"gather"``; CRD's usual sizes (``K = 16384``) always take ``"matmul"``.
  On CUDA ``"auto"`` uses the same rule; it is a reasoned default (one read of the bank
  against ``B * (K+1)`` scattered row reads), not a measured one: run the benchmark in ``docs/crd.md``
  and pass ``method=`` explicitly to change it.
"""

_METHODS: tuple[str, ...] = ("auto", "matmul", "gather")
# "auto" picks the matmul path when the gathered rows outnumber n_data / _AUTO_RATIO (CPU crossover
# measured at B * (K+1) / n_data ~ 0.6, see docs/crd.md).
_AUTO_RATIO = 2
# Default chunk of the gather path: about 2**22 gathered float32 elements (16 MiB) per chunk.
_CHUNK_ELEMENTS = 1 << 22


def check_index_range(name: str, indices: Tensor, n_data: int) -> None:
    """Raise a ``ValueError`` unless every entry of ``indices`` lies in ``[0, n_data)``.

    This reads the tensor's values and therefore synchronises with the device (one
    ``min``/``max`` transfer); callers that must not synchronise skip it (``validate=False``).
    """
    if indices.numel() == 0:
        return
    lo, hi = torch.aminmax(indices.detach())
    lo_i, hi_i = int(lo), int(hi)
    if lo_i < 0 or hi_i >= n_data:
        raise ValueError(f"{name} must lie in [0, n_data={n_data}), got values in [{lo_i}, {hi_i}]")


def crd_embed(features: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    r"""One CRD embedding head: flatten, linear projection, L2 normalisation.

    .. math::

        v = \frac{W \operatorname{flat}(x) + b}{\lVert W \operatorname{flat}(x) + b \rVert_2}

    Args:
        features: ``(B, ...)`` features of a network (flattened from dimension 1).
        weight: ``(d, D)`` projection weight, ``D`` the flattened feature width.
        bias: optional ``(d,)`` bias.

    Shape:
        ``(B, *)`` -> ``(B, d)``. Under autocast in autocast's dtype; outside autocast,
        features and weights of different float dtypes (float16 or bfloat16 features with a
        float32 head) are computed in the wider of the two dtypes (``torch.promote_types``),
        which is also the output's.

    Raises:
        TypeError: if ``features`` or ``weight`` are not floating point.
        ShapeError: if ``features`` has no batch dimension or its flattened width is not ``D``.

    Paper: Tian, Krishnan & Isola, *Contrastive Representation Distillation*, ICLR 2020.

    Example:
        >>> import torch
        >>> v = crd_embed(torch.ones(2, 3, 2), torch.ones(4, 6))
        >>> v.shape, v.norm(dim=1)
        (torch.Size([2, 4]), tensor([1., 1.]))
    """
    check_float("features", features)
    check_float("weight", weight)
    if features.ndim < 2:
        raise ShapeError(
            f"features must have a batch dimension and features, (B, ...), got shape {tuple(features.shape)}"
        )
    check_ndim("weight", weight, (2,), "(feat_dim, in_features)")
    x = features.flatten(1)
    if x.shape[1] != weight.shape[1]:
        raise ShapeError(
            f"features flattened to width {x.shape[1]} (shape {tuple(features.shape)}), "
            f"but the embedding head expects in_features={weight.shape[1]}"
        )
    if bias is not None:
        check_float("bias", bias)
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):  # autocast casts both itself
        dtype = torch.promote_types(x.dtype, weight.dtype)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    return unit_rows(F.linear(x, weight, bias))


def _resolve_method(method: str, rows: int, n_data: int) -> str:
    if method not in _METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, _METHODS))}, got {method!r}")
    if method == "auto":
        return "matmul" if rows * _AUTO_RATIO >= n_data else "gather"
    return method


class _GatherDot(torch.autograd.Function):
    """``out[b, j] = <v[b], bank[idx[b, j]]>`` in float32, chunk by chunk; no gradient to the bank."""

    @staticmethod
    def forward(v: Tensor, bank: Tensor, idx: Tensor, chunk: int) -> Tensor:
        out = v.new_empty(idx.shape, dtype=torch.float32)
        vf = v.float().unsqueeze(2)
        for s in range(0, idx.shape[1], chunk):
            w = bank[idx[:, s : s + chunk]].float()  # (B, c, d)
            out[:, s : s + chunk] = torch.bmm(w, vf).squeeze(2)
        return out

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        v, bank, idx, chunk = inputs
        ctx.save_for_backward(bank, idx)
        ctx.chunk = chunk
        ctx.v_dtype = v.dtype

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, None, None, None]:
        (grad,) = grads
        bank, idx = ctx.saved_tensors
        chunk: int = ctx.chunk
        gv = grad.new_zeros((idx.shape[0], bank.shape[1]), dtype=torch.float32)
        g = grad.float()
        for s in range(0, idx.shape[1], chunk):
            w = bank[idx[:, s : s + chunk]].float()
            gv += torch.bmm(g[:, s : s + chunk].unsqueeze(1), w).squeeze(1)
        return gv.to(ctx.v_dtype), None, None, None


def crd_logits(
    anchor: Tensor,
    bank: Tensor,
    indices: Tensor,
    *,
    temperature: float = 0.07,
    method: ScoreMethod = "auto",
    chunk_size: int | None = None,
    validate: bool = True,
) -> Tensor:
    r"""Scaled similarities of each anchor with the bank rows it is contrasted with, in float32.

    .. math::

        s_{bj} = \langle v_b, w_{i_{bj}} \rangle / \tau

    where :math:`v_b` is the anchor embedding, :math:`w` the bank and :math:`i_{bj}` the
    ``j``-th index of row ``b`` (column 0 is the positive by convention). The product is taken
    in float32 with autocast disabled (``exp(1 / 0.07)`` overflows float16), whatever the dtype
    of the anchor (float16, bfloat16) or of the bank (float32 or bfloat16). The ``(B, K+1, d)``
    gathered rows are never materialised; see :data:`ScoreMethod` for the two paths. The bank
    receives no gradient. On CUDA with TF32 matmuls enabled
    (``torch.backends.cuda.matmul.allow_tf32``) the ``"matmul"`` path rounds its inputs to TF32.

    The bank is saved for the backward pass: do not modify it in place before ``backward()``
    (:class:`kdloss.ContrastMemory` defers its in-place update until no graph holds the bank).

    Args:
        anchor: ``(B, d)`` embeddings (any float dtype).
        bank: ``(n_data, d)`` memory bank (float32 or bfloat16).
        indices: ``(B, K+1)`` integer indices into the bank.
        temperature: :math:`\tau > 0` (0.07 in the paper).
        method: ``"auto"``, ``"matmul"`` or ``"gather"``.
        chunk_size: columns per chunk of the ``"gather"`` path (default: about 4M gathered
            elements per chunk).
        validate: also check that the indices lie in ``[0, n_data)`` (reads them: one host
            synchronisation).

    Shape:
        ``(B, d), (N, d), (B, K+1) -> (B, K+1)`` float32.

    Raises:
        TypeError: non-float anchor/bank, non-integer indices.
        ShapeError: wrong ranks, feature widths or batch sizes.
        ValueError: different devices, bad ``temperature``/``method``/``chunk_size``, indices
            out of range (with ``validate``).

    Paper: Tian, Krishnan & Isola, *Contrastive Representation Distillation*, ICLR 2020.

    Example:
        >>> import torch
        >>> bank = torch.eye(3)
        >>> crd_logits(torch.tensor([[1.0, 0.0, 0.0]]), bank, torch.tensor([[0, 1]]), temperature=0.5)
        tensor([[2., 0.]])
    """
    check_float("anchor", anchor)
    check_float("bank", bank)
    check_integer("indices", indices)
    check_ndim("anchor", anchor, (2,), "(B, feat_dim)")
    check_ndim("bank", bank, (2,), "(n_data, feat_dim)")
    check_ndim("indices", indices, (2,), "(B, K+1)")
    check_same_device(anchor=anchor, bank=bank, indices=indices)
    if anchor.shape[1] != bank.shape[1]:
        raise ShapeError(f"anchor must have the bank's feature width {bank.shape[1]}, got shape {tuple(anchor.shape)}")
    if indices.shape[0] != anchor.shape[0]:
        raise ShapeError(
            f"indices and anchor must have the same batch size, got shapes {tuple(indices.shape)} "
            f"and {tuple(anchor.shape)}"
        )
    check_positive("temperature", temperature)
    check_positive_int("chunk_size", chunk_size, allow_none=True)
    path = _resolve_method(method, indices.numel(), bank.shape[0])
    if validate:
        check_index_range("indices", indices, bank.shape[0])
    return _score_views([anchor], [bank], indices.long(), temperature, path, chunk_size)[0]


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager[Any]:
    """Disable autocast only where it is on (entering ``torch.autocast`` costs host time)."""
    if device_type != "meta" and torch.is_autocast_enabled(device_type):  # (meta: no autocast)
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def _score_views(
    anchors: Sequence[Tensor],
    banks: Sequence[Tensor],
    idx: Tensor,
    temperature: float,
    path: str,
    chunk_size: int | None,
) -> list[Tensor]:
    """Each ``(B, d)`` anchor against its ``(N, d)`` bank at shared ``(B, K+1)`` long indices -> ``(B, K+1)`` each.

    The banks are read where they are (no stacked copy); a float32 bank is saved for the backward
    pass as it is (``"matmul"``: the transposed view, ``"gather"``: the bank), a bfloat16 one as
    its float32 copy (``"matmul"``) or as it is (``"gather"``).
    """
    out: list[Tensor] = []
    with _autocast_off(anchors[0].device.type):
        for anchor, bank in zip(anchors, banks, strict=True):
            if path == "matmul":
                # 1 / tau applied to the (B, d) anchor, not to the (B, K+1) scores (the same up to rounding)
                full = torch.mm(anchor.float() / temperature, bank.float().t())  # (B, N)
                out.append(full.gather(1, idx))
            else:
                chunk = chunk_size or max(1, _CHUNK_ELEMENTS // max(1, anchor.shape[0] * anchor.shape[1]))
                out.append(_GatherDot.apply(anchor, bank.detach(), idx, chunk) / temperature)
    return out


def crd_normalizer(logits: Tensor, n_data: int) -> Tensor:
    r"""The NCE normalisation constant of one view from a batch of logits: ``mean(exp(s)) * n_data``.

    .. math::

        Z = N \cdot \frac{1}{B (K+1)} \sum_{b, j} e^{s_{bj}}

    CRD sets :math:`Z` once, from the first batch, and keeps it fixed; :class:`kdloss.ContrastMemory`
    stores it so that checkpoints reproduce it. The result is detached.

    Args:
        logits: ``(B, K+1)`` logits from :func:`crd_logits`.
        n_data: the dataset size :math:`N`.

    Shape:
        ``(B, K+1) -> ()`` float32.

    Raises:
        TypeError: non-float logits or a non-integer ``n_data``.
        ValueError: ``n_data < 1``.

    Example:
        >>> import torch
        >>> crd_normalizer(torch.zeros(2, 3), 10)
        tensor(10.)
    """
    check_float("logits", logits)
    _check_n_data(n_data)
    return logits.detach().float().exp().mean() * n_data


def _check_n_data(n_data: int) -> None:
    if isinstance(n_data, bool) or not isinstance(n_data, int):
        raise TypeError(f"n_data must be an int, got {type(n_data).__name__} {n_data!r}")
    if n_data < 1:
        raise ValueError(f"n_data must be >= 1, got {n_data}")


def crd_nce_loss(
    logits: Tensor,
    normalizer: Tensor | float,
    n_data: int,
    *,
    reduction: Reduction = "batchmean",
) -> Tensor:
    r"""NCE loss of one CRD view from its logits: positive in column 0, ``K`` negatives after it.

    With :math:`P_{bj} = e^{s_{bj}} / Z` and the noise rate :math:`c = K / N`, the loss of anchor
    :math:`b` is

    .. math::

        \ell_b = -\log \frac{P_{b0}}{P_{b0} + c} - \sum_{j=1}^{K} \log \frac{c}{P_{bj} + c}
               = \operatorname{softplus}(\log c - \log P_{b0})
                 + \sum_{j=1}^{K} \operatorname{softplus}(\log P_{bj} - \log c),

    computed in the second (log-space, overflow-free) form in float32. The CRD loss is the sum
    of the two views' losses (:class:`kdloss.CRDLoss`). The reference implementation adds
    ``1e-7`` inside its denominators; this function does not (the difference is below 1e-6
    relative for ``K/N`` of the usual size).

    Reductions: ``"none"`` gives :math:`\ell_b` of shape ``(B,)``; ``"sum"`` adds them;
    ``"batchmean"`` (default, the paper's) and ``"mean"`` divide the sum by ``B``.

    Args:
        logits: ``(B, K+1)`` logits :math:`s` (from :func:`crd_logits`), ``K >= 1``.
        normalizer: :math:`Z > 0`, a float or a 0-d tensor (from :func:`crd_normalizer`).
        n_data: the dataset size :math:`N`.
        reduction: ``"none" | "mean" | "batchmean" | "sum"``.

    Shape:
        ``(B, K+1) -> ()`` (or ``(B,)`` for ``"none"``), float32.

    Raises:
        TypeError: non-float logits.
        ShapeError: logits not 2-D or with no negative column.
        ValueError: bad ``n_data``/``reduction``/``normalizer`` (a tensor ``normalizer`` <= 0 is
            caught on the CPU only: reading a CUDA value would synchronise).

    Paper: Tian, Krishnan & Isola, *Contrastive Representation Distillation*, ICLR 2020.

    Example:
        >>> import torch
        >>> crd_nce_loss(torch.zeros(1, 3), 2.0, 4)  # P = 1/2, c = 1/2: -log(1/2) - 2 log(1/2)
        tensor(2.0794)
    """
    check_float("logits", logits)
    check_ndim("logits", logits, (2,), "(B, K+1)")
    if logits.shape[1] < 2:
        raise ShapeError(
            f"logits must have a positive column and at least one negative, got shape {tuple(logits.shape)}"
        )
    _check_n_data(n_data)
    check_reduction(reduction)
    log_z: Tensor | float
    if isinstance(normalizer, Tensor):
        if normalizer.numel() != 1:
            raise ShapeError(f"normalizer must be a scalar, got shape {tuple(normalizer.shape)}")
        # log Z of a Z <= 0 is NaN: checked where reading it is free (CPU, eager), not on CUDA.
        if normalizer.device.type == "cpu" and not torch.compiler.is_compiling() and bool(normalizer.detach() <= 0):
            raise ValueError(
                f"normalizer must be > 0, got {float(normalizer)} (ContrastMemory.normalizers are -1 until its "
                "first training-mode step sets them)"
            )
        log_z = normalizer.detach().float().reshape(()).log()
    else:
        log_z = math.log(check_positive("normalizer", normalizer))
    return reduce_loss(_nce_rows(logits, log_z, n_data), reduction, rows=logits.shape[0])


def _nce_rows(logits: Tensor, log_z: Tensor | float, n_data: int) -> Tensor:
    """Per-anchor NCE loss of ``(..., B, K+1)`` logits with ``log Z`` broadcastable to ``(..., B)``."""
    k = logits.shape[-1] - 1
    log_c = math.log(k / n_data)
    # x = log P - log c; softplus(-x_0) = softplus(x_0) - x_0, so the row's loss is
    # sum_j softplus(x_j) - x_0: one softplus over the whole row
    x = logits.float() - ((log_z + log_c).unsqueeze(-1) if isinstance(log_z, Tensor) else log_z + log_c)
    return F.softplus(x).sum(dim=-1) - x[..., 0]


def crd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    normalizers: Tensor,
    n_data: int,
    *,
    reduction: Reduction = "batchmean",
) -> Tensor:
    r"""The CRD loss of a batch: the two views' NCE losses (:func:`crd_nce_loss`) added, per anchor.

    .. math::

        \ell_b = \ell^{\mathrm{NCE}}_b(s^{S}, Z_S) + \ell^{\mathrm{NCE}}_b(s^{T}, Z_T)

    where :math:`s^{S}` are the student embedding's logits against the teacher bank and
    :math:`s^{T}` the teacher embedding's against the student bank (both from
    :meth:`kdloss.ContrastMemory.score`, positive in column 0), and :math:`Z` the memory's
    normalisers of the two views. ``"batchmean"`` (default, the paper's) and ``"mean"`` divide the
    summed losses by ``B`` (0 for an empty batch), ``"sum"`` adds them, ``"none"`` gives
    :math:`\ell_b`. This is what :class:`kdloss.CRDLoss` returns after its embedding heads and
    its memory.

    Args:
        student_logits: ``(B, K+1)`` logits of the student view, ``K >= 1``.
        teacher_logits: ``(B, K+1)`` logits of the teacher view.
        normalizers: ``(2,)`` :math:`Z` of the student view then of the teacher view (``> 0``;
            not checked on the device: reading it would synchronise).
        n_data: the dataset size :math:`N`.
        reduction: ``"none" | "mean" | "batchmean" | "sum"``.

    Shape:
        ``(B, K+1), (B, K+1), (2,) -> ()`` (or ``(B,)`` for ``"none"``), float32.

    Raises:
        TypeError: non-float logits or normalisers, a non-integer ``n_data``.
        ShapeError: logits not 2-D, of different shapes, without a negative column; normalisers
            not of shape ``(2,)``.
        ValueError: ``n_data < 1``, an unknown ``reduction``, tensors on different devices.

    Paper: Tian, Krishnan & Isola, *Contrastive Representation Distillation*, ICLR 2020.

    Example:
        >>> import torch
        >>> crd_loss(torch.zeros(1, 3), torch.zeros(1, 3), torch.tensor([2.0, 2.0]), 4)  # 2 * crd_nce_loss
        tensor(4.1589)
    """
    check_float("student_logits", student_logits)
    check_float("teacher_logits", teacher_logits)
    check_float("normalizers", normalizers)
    check_ndim("student_logits", student_logits, (2,), "(B, K+1)")
    if teacher_logits.shape != student_logits.shape:
        raise ShapeError(
            f"student_logits and teacher_logits must have the same shape (B, K+1), got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    if student_logits.shape[1] < 2:
        raise ShapeError(
            f"logits must have a positive column and at least one negative, got shape {tuple(student_logits.shape)}"
        )
    if normalizers.shape != (2,):
        raise ShapeError(f"normalizers must have shape (2,) (Z of the two views), got {tuple(normalizers.shape)}")
    check_same_device(student_logits=student_logits, teacher_logits=teacher_logits, normalizers=normalizers)
    _check_n_data(n_data)
    check_reduction(reduction)
    log_z_s, log_z_t = normalizers.log().unbind(0)  # (one operator; indexing twice takes two)
    rows_s = _nce_rows(student_logits, log_z_s, n_data)
    rows_t = _nce_rows(teacher_logits, log_z_t, n_data)
    if reduction == "none":
        return rows_s + rows_t
    total = rows_s.sum() + rows_t.sum()
    if reduction == "sum":
        return total
    return total / max(student_logits.shape[0], 1)


# _last_occurrence compares all pairs of positions up to this batch size ((b, b) int64: 8 MiB at 1024)
_PAIRWISE_MAX = 1024


def _last_occurrence(indices: Tensor, finite: Tensor | None = None) -> Tensor:
    """For each position ``i``, the largest position ``j`` with ``indices[j] == indices[i]``; no sync.

    With ``finite`` (``(B,)`` bool), the largest such ``j`` with ``finite[j]`` when there is one
    (else the largest ``j``): a duplicated index takes its last finite embedding.
    """
    b = indices.shape[0]
    if b == 0:
        return indices.new_zeros(0, dtype=torch.long)
    if b <= _PAIRWISE_MAX:
        # the key of position j: j, plus b where it is finite; among the positions holding the same
        # index, the largest key is the last finite occurrence (else the last one). A (b, b) table:
        # six operators, where the sort below takes fifteen.
        pos = torch.arange(b, device=indices.device)
        key = pos if finite is None else torch.add(pos, finite, alpha=b)
        return ((indices.unsqueeze(1) == indices.unsqueeze(0)) * key).argmax(1)
    if finite is None:
        sorted_idx, perm = torch.sort(indices, stable=True)
    else:
        # key 2i + finite: one index's positions stay together, its finite ones last (by position)
        _, perm = torch.sort(indices.long() * 2 + finite.long(), stable=True)
        sorted_idx = indices[perm]
    pos = torch.arange(b, device=indices.device)
    is_end = torch.ones(b, dtype=torch.bool, device=indices.device)
    is_end[:-1] = sorted_idx[1:] != sorted_idx[:-1]
    end_pos = torch.where(is_end, pos, b)
    group_end = end_pos.flip(0).cummin(0).values.flip(0)
    return torch.empty_like(perm).scatter_(0, perm, perm[group_end])  # scatter: never synchronises


def crd_update_rows(
    bank: Tensor, indices: Tensor, embeddings: Tensor, momentum: float = 0.5, *, validate: bool = True
) -> Tensor:
    r"""The new bank rows of a momentum update, one per index, duplicates resolved (last wins).

    .. math::

        w_i \leftarrow \frac{m\, w_i + (1 - m)\, v}{\lVert m\, w_i + (1 - m)\, v \rVert_2}

    computed in float32. When an index occurs more than once, the **last** occurrence's
    embedding wins and every occurrence gets that same row, so that ``index_copy_`` writes the
    same value whatever the order of the writes (deterministic on every device; this is also
    what the reference implementation's sequential CPU ``index_copy_`` does). Found by a sort,
    without host synchronisation.

    An embedding with a NaN or infinite entry never reaches the bank: its row keeps its old
    value (a duplicated index takes its last *finite* embedding), so one bad sample cannot
    poison the bank for every later step.

    Args:
        bank: ``(n_data, d)`` bank (read only).
        indices: ``(B,)`` integer indices of the rows to update, in ``[0, n_data)``.
        embeddings: ``(B, d)`` embeddings (detached inside).
        momentum: :math:`m \in [0, 1]`.
        validate: also check that the indices lie in ``[0, n_data)`` (reads them: one host
            synchronisation).

    Returns:
        ``(B, d)`` float32 rows to write at ``indices``.

    Raises:
        TypeError: non-float bank/embeddings or non-integer indices.
        ShapeError: mismatched widths or batch sizes.
        ValueError: ``momentum`` outside ``[0, 1]``, indices out of range (with ``validate``),
            different devices.

    Example:
        >>> import torch
        >>> crd_update_rows(torch.tensor([[1.0, 0.0]]), torch.tensor([0]), torch.tensor([[0.0, 1.0]]))
        tensor([[0.7071, 0.7071]])
    """
    _check_update(bank, indices, embeddings, momentum, validate=validate)
    idx = indices.long()
    finite = _finite_rows(embeddings)
    return _momentum_rows(bank.detach()[idx].float(), embeddings, _last_occurrence(idx, finite), momentum, finite)


def _check_update(bank: Tensor, indices: Tensor, embeddings: Tensor, momentum: float, *, validate: bool) -> None:
    check_float("bank", bank)
    check_float("embeddings", embeddings)
    check_integer("indices", indices)
    check_ndim("bank", bank, (2,), "(n_data, feat_dim)")
    check_ndim("indices", indices, (1,), "(B,)")
    check_ndim("embeddings", embeddings, (2,), "(B, feat_dim)")
    check_same_device(bank=bank, indices=indices, embeddings=embeddings)
    if embeddings.shape != (indices.shape[0], bank.shape[1]):
        raise ShapeError(
            f"embeddings must have shape (B, feat_dim) = ({indices.shape[0]}, {bank.shape[1]}), "
            f"got {tuple(embeddings.shape)}"
        )
    check_unit_interval("momentum", momentum)
    if validate:
        check_index_range("indices", indices, bank.shape[0])


def _finite_rows(*embeddings: Tensor) -> Tensor:
    """``(B,)`` bool: the rows whose entries are all finite in every one of the ``(B, d)`` tensors."""
    ok = torch.isfinite(detached(embeddings[0])).all(dim=-1)
    for e in embeddings[1:]:
        ok = ok & torch.isfinite(detached(e)).all(dim=-1)
    return ok


def _momentum_rows(
    old: Tensor, embeddings: Tensor, last: Tensor, momentum: float, finite: Tensor | None = None
) -> Tensor:
    """``normalize(m * old + (1 - m) * emb[last])`` over ``(..., B, d)``, in float32.

    With ``finite`` (``(B,)`` bool, indexed like the embeddings' rows), a row whose chosen
    embedding is not finite keeps ``old``.
    """
    emb = in_dtype(detached(embeddings), torch.float32).index_select(-2, last)
    new = unit_rows(torch.lerp(emb, old, momentum), dim=-1)  # normalize(m old + (1 - m) emb)
    if finite is None:
        return new
    keep = finite.index_select(0, last).unsqueeze(-1)  # (B, 1): the chosen embedding is finite
    return torch.where(keep, new, old)  # (a non-finite row's NaN is not selected)


def crd_memory_update(bank: Tensor, indices: Tensor, embeddings: Tensor, momentum: float = 0.5) -> Tensor:
    r"""Momentum update of a memory bank as a pure function: returns the updated bank (a new tensor).

    .. math::

        w_i \leftarrow \frac{m\, w_i + (1 - m)\, v}{\lVert m\, w_i + (1 - m)\, v \rVert_2}
        \quad \text{for each index } i \text{ of the batch}

    Rows not indexed are unchanged; a duplicated index takes its last occurrence's embedding
    and a non-finite embedding leaves its row unchanged (see :func:`crd_update_rows`). The bank
    keeps its dtype (float32 or bfloat16); the arithmetic is float32.
    :class:`kdloss.ContrastMemory` applies the same rows in place.

    Args:
        bank: ``(n_data, d)`` bank.
        indices: ``(B,)`` integer indices in ``[0, n_data)``.
        embeddings: ``(B, d)`` new embeddings (detached inside).
        momentum: :math:`m \in [0, 1]` (0.5 in the paper).

    Shape:
        ``(N, d), (B,), (B, d) -> (N, d)``.

    Raises:
        TypeError: non-float bank/embeddings or non-integer indices.
        ShapeError: mismatched widths or batch sizes.
        ValueError: ``momentum`` outside ``[0, 1]``, indices out of range, different devices.

    Example:
        >>> import torch
        >>> crd_memory_update(torch.eye(2), torch.tensor([1, 1]), torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
        tensor([[1.0000, 0.0000],
                [0.7071, 0.7071]])
    """
    rows = crd_update_rows(bank, indices, embeddings, momentum)
    return bank.index_copy(0, indices.long(), rows.to(bank.dtype))


# The building blocks that kdloss.parts.contrastive.ContrastMemory shares with the functions above,
# under the names it imports.
SCORE_METHODS = _METHODS
resolve_score_method = _resolve_method
score_views = _score_views
finite_rows = _finite_rows
last_occurrence = _last_occurrence
momentum_rows = _momentum_rows
