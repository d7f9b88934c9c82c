"""CRD's trainable and stateful parts: the embedding head and the memory banks (with their normalisers).

:class:`CRDEmbed` (trainable) and :class:`ContrastMemory` (buffers: two banks, the fixed
normalisers, negative sampling) are the stateful half of contrastive representation distillation
(Tian, Krishnan & Isola, ICLR 2020); the arithmetic lives in :mod:`kdloss.functional.contrastive`.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Iterator, Mapping
from typing import Any, Literal, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from kdloss._validate import (
    ShapeError,
    check_float,
    check_integer,
    check_ndim,
    check_positive,
    check_positive_int,
    check_same_device,
    check_unit_interval,
)
from kdloss.functional.contrastive import (
    SCORE_METHODS,
    ScoreMethod,
    check_index_range,
    crd_embed,
    finite_rows,
    last_occurrence,
    momentum_rows,
    resolve_score_method,
    score_views,
)

__all__ = ["CRDEmbed", "CRDScores", "ContrastMemory", "NegativeSampling"]

NegativeSampling = Literal["uniform", "class"]
"""``"uniform"``: negatives uniform over the dataset, with replacement (the reference's default,
which may also draw the anchor itself). ``"class"``: only samples of other classes (the
reference recipe's "exact" mode); needs the dataset's labels."""


class CRDScores(NamedTuple):
    """One batch's scores from :meth:`ContrastMemory.score`: both views' ``(B, K+1)`` float32 logits
    (positive in column 0) and the ``(2,)`` normalisers ``Z`` to divide them by."""

    student_logits: Tensor
    teacher_logits: Tensor
    normalizers: Tensor


class CRDEmbed(nn.Module):
    """A CRD embedding head: flatten, ``nn.Linear(in_features, feat_dim)``, L2 normalisation.

    See :func:`kdloss.functional.crd_embed`.

    Args:
        in_features: the flattened width of the features it embeds.
        feat_dim: the embedding width (128 in the paper).

    Raises:
        ValueError: if ``in_features`` or ``feat_dim`` is not a positive int.

    Example:
        >>> import torch
        >>> CRDEmbed(12, 4)(torch.randn(2, 3, 4)).shape
        torch.Size([2, 4])
    """

    def __init__(self, in_features: int, feat_dim: int = 128) -> None:
        super().__init__()
        check_positive_int("in_features", in_features)
        check_positive_int("feat_dim", feat_dim)
        self.linear = nn.Linear(in_features, feat_dim)

    def forward(self, features: Tensor) -> Tensor:
        return crd_embed(features, self.linear.weight, self.linear.bias)


_SAMPLINGS: tuple[str, ...] = ("uniform", "class")
_BANK_DTYPES = (torch.float32, torch.bfloat16)
_RAND_HIGH = 1 << 62  # random integers reduced modulo the row's range: bias below 2**-40


class ContrastMemory(nn.Module):
    r"""The two CRD memory banks, their fixed normalisers, the momentum update and negative sampling.

    Buffers (all in ``state_dict``, so a checkpoint and a resume reproduce them):

    - ``bank_student``, ``bank_teacher``: ``(n_data, feat_dim)`` banks in ``dtype`` (float32 or
      bfloat16), initialised uniformly in :math:`[-1/\sqrt{d/3}, 1/\sqrt{d/3}]`;
    - ``normalizers``: ``(2,)`` float32, :math:`Z` of the student view then of the teacher view,
      ``-1`` until the first training step sets them to ``mean(exp(logits)) * n_data`` of that
      batch, then fixed (a loaded checkpoint keeps its values);
    - ``labels``: ``(n_data,)`` int64 dataset labels, with ``negatives="class"`` only;
    - ``skipped_rows``: ``()`` int64, the number of samples kept out of the banks and of ``Z``
      because their student or teacher embedding held a NaN or an infinity (counted over
      training steps and, under DDP, over ranks; not part of ``state_dict``).

    Non-finite embeddings (a NaN from a bad sample, an overflow in half precision) never reach
    the state: such a sample's bank rows keep their values, ``Z`` is taken from the batch's
    finite samples only (a batch without any, or an empty batch, leaves ``Z`` unset for the
    next step to set), the sample is counted in ``skipped_rows``, and with ``validate=True`` a
    ``RuntimeWarning`` says so the first time, at the next call (whose index check reads values
    anyway; with ``validate=False`` nothing is read on the host: read ``skipped_rows``
    yourself). The step's own logits, and so its loss, stay NaN for such a sample: the problem
    is reported, not hidden, and every later step is unaffected.

    One call (:meth:`forward`) scores the student embedding against the **teacher** bank and the
    teacher embedding against the **student** bank, at the anchor's own index (column 0, the
    positive) and ``K`` negatives, returns the two ``(B, K+1)`` float32 logit tensors, and, in
    training mode, sets :math:`Z` on the first call and updates the positives' rows
    (``row = normalize(m * row + (1 - m) * embedding)``) after scoring. Nothing in a step reads a
    tensor's value on the host when ``validate=False``: negatives are sampled on the banks' device
    with ``torch.randint``/``torch.rand``.

    The scores are taken against the banks themselves, not a copy, and the autograd graph keeps
    the bank for its backward pass, so the update of step ``t`` (its rows are computed in step
    ``t``) is written in place only once no graph holds the bank any more: at the start of the
    next call, or before the banks are read (attribute access, :meth:`named_buffers`,
    ``state_dict``, ``.to()``), or by :meth:`flush`. In the usual loop (forward, backward, next
    forward) that is after ``backward()`` freed the graph, and the rows are written in place; if
    a graph still holds the bank (a loss kept for a later ``backward()``, ``retain_graph=True``,
    several forwards summed into one loss) the updated bank is a new tensor (copy on write) and
    that graph keeps the old one. Either way each step scores against the banks as the previous
    step left them, exactly as an immediate update would.

    Duplicate indices in a batch: every occurrence is scored; the bank row takes the **last**
    occurrence's embedding (after the all-gather under DDP: the highest rank's last occurrence),
    deterministically, see :func:`kdloss.functional.crd_update_rows`.

    DDP: when ``torch.distributed`` is initialised with more than one process (in
    ``process_group``), the detached embeddings and indices of every rank are all-gathered
    before the update, so every rank applies the same update and holds bit-identical banks; the
    first batch's :math:`Z` is averaged over ranks. Negatives are drawn per rank from the full
    bank. The gather carries no gradient: each rank's loss depends on its own embeddings only,
    and DDP's gradient averaging gives the gradient of the mean of the per-rank losses, which
    for equal batch sizes is the single-process loss over the concatenated batch (no extra
    scaling). Every rank must call with the same batch size (``DistributedSampler`` ensures it).
    DDP would otherwise broadcast rank 0's buffers on each forward; that is harmless here (the
    banks are identical) but costs two bank transfers per step: wrap with
    ``broadcast_buffers=False`` or keep this module out of the DDP wrapper (``docs/crd.md``).

    Args:
        n_data: dataset size :math:`N` (rows of each bank).
        feat_dim: embedding width :math:`d`.
        n_negatives: :math:`K` negatives per anchor (16384 in the paper).
        temperature: :math:`\tau` (0.07).
        momentum: :math:`m` of the bank update (0.5).
        negatives: ``"uniform"`` or ``"class"``, see :data:`NegativeSampling`.
        labels: ``(n_data,)`` non-negative integer labels of the dataset, required by
            ``negatives="class"`` (allowed, and stored, otherwise).
        replacement: ``"class"`` mode only. ``False`` (default, the reference's rule): each
            anchor's ``K`` negatives are distinct when its class has at least ``K`` samples of
            other classes, drawn with replacement otherwise; costs a ``(B, n_data)`` random key
            matrix and a top-k per step. ``True``: always with replacement (one ``randint`` per
            negative, the fastest).
        dtype: bank dtype, ``torch.float32`` or ``torch.bfloat16``; scores are float32 anyway.
        method: scoring path, see :data:`kdloss.functional.contrastive.ScoreMethod`.
        chunk_size: chunk of the ``"gather"`` path.
        validate: check index ranges on every call (host synchronisations; the same reads
            report the previous step's non-finite samples); ``False`` for
            a synchronisation-free step once the data pipeline is trusted.
        process_group: the DDP process group (default: the world), ignored without DDP.
        device: where to create the buffers.
        generator: seed source for the initial banks (CPU generator), for reproducible runs.

    Raises:
        ValueError: bad sizes or hyper-parameters, ``negatives="class"`` without labels or with
            fewer than two classes, an unknown ``dtype``/``method``/``negatives``.
        ShapeError: ``labels`` not of shape ``(n_data,)`` (the dataset size does not match).

    Example:
        >>> import torch
        >>> mem = ContrastMemory(100, 8, n_negatives=16)
        >>> v = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
        >>> ls, lt = mem(v, v, torch.tensor([0, 1, 2, 3]))
        >>> ls.shape, bool((mem.normalizers > 0).all())
        (torch.Size([4, 17]), True)
    """

    bank_student: Tensor
    bank_teacher: Tensor
    normalizers: Tensor
    labels: Tensor
    skipped_rows: Tensor
    _class_order: Tensor
    _class_start: Tensor
    _class_count: Tensor
    _row_too_few: Tensor

    def __init__(
        self,
        n_data: int,
        feat_dim: int = 128,
        *,
        n_negatives: int = 16384,
        temperature: float = 0.07,
        momentum: float = 0.5,
        negatives: NegativeSampling = "uniform",
        labels: Tensor | None = None,
        replacement: bool = False,
        dtype: torch.dtype = torch.float32,
        method: ScoreMethod = "auto",
        chunk_size: int | None = None,
        validate: bool = True,
        process_group: Any = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        # the update of the last training step, written by flush(), and the bank references that
        # autograd graphs saved (alive while a graph may still need the bank's current values)
        self._pending: tuple[Tensor, Tensor] | None = None
        self._saved_refs: list[weakref.ref[_SavedBank]] = []
        for name, value in (("n_data", n_data), ("feat_dim", feat_dim), ("n_negatives", n_negatives)):
            check_positive_int(name, value)
        self.n_data = n_data
        self.feat_dim = feat_dim
        self.n_negatives = n_negatives
        self.temperature = check_positive("temperature", temperature)
        self.momentum = check_unit_interval("momentum", momentum)
        if negatives not in _SAMPLINGS:
            raise ValueError(f"negatives must be one of {', '.join(map(repr, _SAMPLINGS))}, got {negatives!r}")
        self.negatives: NegativeSampling = negatives
        self.replacement = bool(replacement)
        if dtype not in _BANK_DTYPES:
            raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
        if method not in SCORE_METHODS:
            raise ValueError(f"method must be one of {', '.join(map(repr, SCORE_METHODS))}, got {method!r}")
        self.method: ScoreMethod = method
        self.chunk_size = check_positive_int("chunk_size", chunk_size, allow_none=True)
        self.validate = bool(validate)
        self.process_group = process_group

        bound = 1.0 / math.sqrt(feat_dim / 3.0)
        for name in ("bank_student", "bank_teacher"):
            bank = torch.rand(n_data, feat_dim, generator=generator).mul_(2 * bound).sub_(bound)
            self.register_buffer(name, bank.to(device=device, dtype=dtype))
        self.register_buffer("normalizers", torch.full((2,), -1.0, device=device))
        self.register_buffer("skipped_rows", torch.zeros((), dtype=torch.long, device=device), persistent=False)
        self._z_known = False
        self._warned_nonfinite = False
        self._unreported: tuple[Tensor, int] | None = None  # the last step's non-finite count, not read yet

        if labels is None:
            if negatives == "class":
                raise ValueError(
                    "negatives='class' samples negatives from other classes and needs the dataset's labels: "
                    "pass labels=<(n_data,) integer tensor>"
                )
        else:
            check_integer("labels", labels)
            if labels.shape != (n_data,):
                raise ShapeError(
                    f"labels must have one entry per dataset sample, shape (n_data,) = ({n_data},), "
                    f"got {tuple(labels.shape)}: the dataset size does not match the bank"
                )
            if int(labels.min()) < 0:
                raise ValueError(f"labels must be non-negative class ids, got minimum {int(labels.min())}")
            self.register_buffer("labels", labels.detach().to(device=device, dtype=torch.long).clone())
            self._build_class_tables()

    # -- class tables ------------------------------------------------------------------------
    def _build_class_tables(self) -> None:
        """Per-class lists as one order (samples sorted by class) + start/count per class; built once."""
        labels = self.labels
        n_classes = int(labels.max()) + 1
        count = torch.bincount(labels, minlength=n_classes)
        start = torch.cumsum(count, 0) - count
        order = torch.argsort(labels, stable=True)
        other = self.n_data - count
        if self.negatives == "class" and int(other[count > 0].min()) == 0:
            raise ValueError("negatives='class' needs at least two classes in labels, got one")
        for name, value in (
            ("_class_order", order),
            ("_class_start", start),
            ("_class_count", count),
            ("_row_too_few", other < self.n_negatives),
        ):
            self.register_buffer(name, value, persistent=False)
        # static: can any class draw K distinct negatives, must any class draw with replacement?
        self._any_fits = bool((other >= self.n_negatives).any())
        self._any_too_few = bool(((other < self.n_negatives) & (count > 0)).any())

    # -- sampling ----------------------------------------------------------------------------
    def sample_negatives(self, indices: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``(B, K)`` negative indices for the anchors ``indices`` on the banks' device, without sync.

        ``"uniform"``: ``torch.randint(0, n_data)``. ``"class"``: for an anchor of class ``c``,
        positions in the other classes' part of the class-sorted order (``n_data - count[c]``
        of them) are drawn and mapped past class ``c``'s segment, so the anchor's class is never
        drawn; without replacement when enough (``replacement=False``, via random keys and
        top-k), with replacement otherwise.

        Args:
            indices: ``(B,)`` integer anchor indices (only their labels matter, class mode).
            generator: optional ``torch.Generator`` on the banks' device.
        """
        device = self.bank_student.device
        b, k = indices.shape[0], self.n_negatives
        if self.negatives == "uniform":
            return torch.randint(0, self.n_data, (b, k), device=device, generator=generator)
        cls = self.labels[indices.long()]
        count = self._class_count[cls]
        start = self._class_start[cls]
        with_repl = self._sample_with_replacement(start, count, b, k, generator)
        if self.replacement or not self._any_fits:
            return with_repl
        keys = torch.rand(b, self.n_data, device=device, generator=generator)
        same = self.labels.unsqueeze(0) == cls.unsqueeze(1)
        keys.masked_fill_(same, -1.0)
        distinct = keys.topk(k, dim=1, sorted=False).indices
        if not self._any_too_few:
            return distinct
        return torch.where(self._row_too_few[cls].unsqueeze(1), with_repl, distinct)

    def _sample_with_replacement(
        self, start: Tensor, count: Tensor, b: int, k: int, generator: torch.Generator | None
    ) -> Tensor:
        device = self.bank_student.device
        n_other = (self.n_data - count).unsqueeze(1)
        r = torch.randint(0, _RAND_HIGH, (b, k), device=device, generator=generator) % n_other
        pos = r + torch.where(r >= start.unsqueeze(1), count.unsqueeze(1), 0)
        return self._class_order[pos]

    # -- distributed helpers -----------------------------------------------------------------
    def _world(self) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return int(dist.get_world_size(self.process_group))

    def _all_gather(self, t: Tensor) -> Tensor:
        world = self._world()
        if world == 1:
            return t
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous(), group=self.process_group)
        return torch.cat(parts, 0)

    # -- validation --------------------------------------------------------------------------
    def _check_inputs(self, student: Tensor, teacher: Tensor, indices: Tensor, negatives: Tensor | None) -> None:
        check_float("student_embedding", student)
        check_float("teacher_embedding", teacher)
        check_ndim("student_embedding", student, (2,), "(B, feat_dim)")
        check_ndim("teacher_embedding", teacher, (2,), "(B, feat_dim)")
        for name, t in (("student_embedding", student), ("teacher_embedding", teacher)):
            if t.shape[1] != self.feat_dim:
                raise ShapeError(f"{name} must have feat_dim={self.feat_dim} columns, got shape {tuple(t.shape)}")
        check_integer("indices", indices)
        check_ndim("indices", indices, (1,), "(B,): the dataset index of each sample")
        b = student.shape[0]
        if teacher.shape[0] != b or indices.shape[0] != b:
            raise ShapeError(
                "student_embedding, teacher_embedding and indices must have the same batch size, got shapes "
                f"{tuple(student.shape)}, {tuple(teacher.shape)} and {tuple(indices.shape)}"
            )
        check_same_device(bank=self.bank_student, student_embedding=student, teacher_embedding=teacher, indices=indices)
        if negatives is not None:
            check_integer("negatives", negatives)
            if negatives.shape != (b, self.n_negatives):
                raise ShapeError(
                    f"negatives must have shape (B, n_negatives) = ({b}, {self.n_negatives}), "
                    f"got {tuple(negatives.shape)}"
                )
            check_same_device(bank=self.bank_student, negatives=negatives)
        if self.validate:
            check_index_range("indices", indices, self.n_data)
            if negatives is not None:
                check_index_range("negatives", negatives, self.n_data)
            self._warn_nonfinite()  # the previous step's count: the reads above synchronised already

    # -- the step ----------------------------------------------------------------------------
    def forward(
        self,
        student_embedding: Tensor,
        teacher_embedding: Tensor,
        indices: Tensor,
        negatives: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Score both views, then (training mode) set ``Z`` once and update the banks.

        Args:
            student_embedding: ``(B, feat_dim)`` L2-normalised student embeddings.
            teacher_embedding: ``(B, feat_dim)`` L2-normalised teacher embeddings.
            indices: ``(B,)`` dataset indices of the batch (the positives).
            negatives: optional ``(B, K)`` negative indices; sampled when ``None``.
            generator: optional generator for the sampling (on the banks' device).

        Returns:
            ``(student_logits, teacher_logits)``, each ``(B, K+1)`` float32, positive in
            column 0: the student embedding against the teacher bank, and the teacher embedding
            against the student bank. Divide ``exp`` of them by :attr:`normalizers` (see
            :func:`kdloss.functional.crd_nce_loss`).

        Raises:
            TypeError, ShapeError, ValueError: bad inputs (checked before any state changes).
        """
        s, t = self._score(student_embedding, teacher_embedding, indices, negatives, generator)
        return s, t

    def scores(
        self,
        student_embedding: Tensor,
        teacher_embedding: Tensor,
        indices: Tensor,
        negatives: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """:meth:`forward` with both views stacked: ``(2, B, K+1)`` float32 (student view first)."""
        return torch.stack(self._score(student_embedding, teacher_embedding, indices, negatives, generator))

    def score(
        self,
        student_embedding: Tensor,
        teacher_embedding: Tensor,
        indices: Tensor,
        negatives: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> CRDScores:
        """:meth:`forward`, and the normalisers ``Z`` to divide this batch's scores by (:meth:`normalizers_for`).

        What :func:`kdloss.functional.crd_loss` takes: ``crd_loss(*memory.score(v_s, v_t, idx),
        memory.n_data)``. The memory owns ``Z``: the stored one once a training step set it, else
        this batch's own (evaluation first, or no usable batch yet). In training mode the step has
        just stored it (this batch's, averaged over the ranks, when it was unset), so it is not
        computed twice.
        """
        s, t = self._score(student_embedding, teacher_embedding, indices, negatives, generator)
        # Z: a training step has just stored it (set, or this batch's own when it was unset, or -1
        # when the batch had no finite sample: what normalizers_for would compute again); in
        # evaluation the stored one, else (evaluation first) this batch's own
        z = self.normalizers if self.training else self.normalizers_for(s, t, student_embedding, teacher_embedding)
        return CRDScores(s, t, z)

    def _score(
        self,
        student_embedding: Tensor,
        teacher_embedding: Tensor,
        indices: Tensor,
        negatives: Tensor | None,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, Tensor]:
        self._check_inputs(student_embedding, teacher_embedding, indices, negatives)
        self.flush()  # the previous step's update, before anything reads the banks
        bank_teacher, bank_student = self._bank("bank_teacher"), self._bank("bank_student")
        idx = indices.long()
        if negatives is None:
            negatives = self.sample_negatives(idx, generator)
        contrast = torch.cat([idx.unsqueeze(1), negatives.long()], dim=1)

        # View 0: student embedding vs teacher bank; view 1: teacher embedding vs student bank. The
        # graph saves the banks themselves; the pack hook records that, so flush() knows when an
        # in-place write is safe.
        path = resolve_score_method(self.method, contrast.numel(), self.n_data)
        self._saved_refs = [r for r in self._saved_refs if r() is not None]
        with torch.autograd.graph.saved_tensors_hooks(self._pack_saved, _unpack_saved):
            ls, lt = score_views(
                [student_embedding, teacher_embedding],
                [bank_teacher, bank_student],
                contrast,
                self.temperature,
                path,
                self.chunk_size,
            )

        if self.training:
            with torch.no_grad():  # (no graph is built here: nothing needs detaching)
                all_idx = self._all_gather(idx)
                # (B, 2, d): teacher then student embedding, the order of the banks below
                emb = self._all_gather(torch.stack((teacher_embedding, student_embedding), 1))
                # both embeddings of the sample finite: the sum of its (unit-norm, so bounded) entries is
                # finite exactly when every entry is, and s - s == 0 exactly when s is finite
                total = emb.sum((1, 2))
                finite = total.sub_(total) == 0
                n_bad = finite.numel() - finite.sum()
                self.skipped_rows += n_bad
                if self.validate and not self._warned_nonfinite:
                    # read at the next call's index check, where the device is idle anyway
                    self._unreported = (n_bad, finite.numel())
                if not self._z_known:  # this rank's samples set Z (averaged over ranks)
                    local = finite if self._world() == 1 else finite_rows(student_embedding, teacher_embedding)
                    self._set_normalizers(ls, lt, local)
                old = torch.stack([bank_teacher.index_select(0, all_idx), bank_student.index_select(0, all_idx)])
                last = last_occurrence(all_idx, finite)
                rows = momentum_rows(old.float(), emb.transpose(0, 1), last, self.momentum, finite)
                self._pending = (all_idx, rows)
                if not self._saved_refs:  # no graph holds the banks (no grad, or eval of a no-grad step)
                    self.flush()
        return ls, lt

    def _set_normalizers(self, ls: Tensor, lt: Tensor, finite: Tensor) -> None:
        """Set ``Z`` (where it is unset) from this batch's finite samples, over all ranks; no host sync.

        ``Z = mean(exp(logits)) * n_data`` over the samples with finite embeddings (their logits
        are finite). Without such a sample (an empty batch, or only non-finite embeddings)
        ``Z`` stays unset, and so does ``_z_known``: the next step tries again.
        """
        with torch.no_grad():
            # exp(logits) times the finite mask: a sample finite in one view and not in the other
            # gives 0 there, a NaN row of the view's own anchor NaN, which nansum leaves out
            keep = finite.unsqueeze(1)
            sums = torch.stack((torch.nansum(ls.float().exp() * keep), torch.nansum(lt.float().exp() * keep)))
            count = finite.sum()
            world = self._world()
            if world > 1:
                both = torch.cat((sums, count.float().unsqueeze(0)))
                dist.all_reduce(both, group=self.process_group)
                sums, count = both[:2], both[2]
            # 0 / 0 (no finite sample) is NaN: unusable, Z stays -1 (a finite batch's Z is > 0)
            z = torch.nan_to_num(sums.mul_(self.n_data / max(ls.shape[1], 1)).div_(count), nan=-1.0)
            # keep a Z that is already set (e.g. loaded from a checkpoint)
            self.normalizers.copy_(torch.where(self.normalizers > 0, self.normalizers, z))
        if ls.shape[0] == 0 and world == 1:
            return  # nothing to learn from: known on the host, no read needed
        if self.validate:
            self._z_known = bool((self.normalizers > 0).all())
        # validate=False: the host cannot know whether this batch had a finite sample without
        # reading it (a synchronisation), so Z stays "unknown" and this runs again each step; it
        # changes nothing once Z is set, at the cost of an exp and a sum over the logits.

    def normalizers_for(
        self, student_logits: Tensor, teacher_logits: Tensor, student_embedding: Tensor, teacher_embedding: Tensor
    ) -> Tensor:
        """The ``(2,)`` ``Z`` to divide this batch's scores by: the stored one once set, else this batch's own.

        Before any training step has set ``Z`` (evaluation first, or an empty or all-non-finite
        first batch), ``Z`` of the batch's samples with finite embeddings, not stored; ``-1``
        where there is none. Use it with the logits of :meth:`forward` for the same batch.
        """
        if self._z_known:
            return self.normalizers
        finite = finite_rows(student_embedding, teacher_embedding)
        z = _z_from_sums(
            _normalizer_sums(student_logits.detach(), teacher_logits.detach(), finite), student_logits, self.n_data
        )
        return torch.where(self.normalizers > 0, self.normalizers, z)

    def _warn_nonfinite(self) -> None:
        """Warn (once per memory) if the previous training step kept samples out of the state."""
        pending, self._unreported = self._unreported, None
        if pending is None or self._warned_nonfinite:
            return
        n_bad = int(pending[0])
        if n_bad:
            self._warned_nonfinite = True
            warnings.warn(
                f"ContrastMemory: {n_bad} of {pending[1]} samples of the previous training step had NaN or infinite "
                "student or teacher embeddings; they were kept out of the memory banks and of Z (counted in "
                "ContrastMemory.skipped_rows), and that step's loss was NaN for them. Check the inputs and the "
                "numerics (e.g. half-precision overflow); this is warned once per memory.",
                RuntimeWarning,
                stacklevel=4,
            )

    def _pack_saved(self, t: Tensor) -> Any:
        """Saved-tensor pack hook of the scoring: wrap a tensor that shares a bank's storage, and track it."""
        for name in ("bank_teacher", "bank_student"):
            bank = self._bank(name)
            if t.device == bank.device and _same_storage(t, bank):
                holder = _SavedBank(t)
                self._saved_refs.append(weakref.ref(holder))
                return holder
        return t

    def _bank(self, name: str) -> Tensor:
        """A bank as stored, without the flush of attribute access."""
        bank = self._buffers[name]
        if bank is None:  # only if a user set the buffer to None
            raise RuntimeError(f"ContrastMemory.{name} is None")
        return bank

    def flush(self) -> None:
        """Write the last training step's bank update now (a no-op when there is none).

        Called by the next :meth:`forward` and before the banks are read; call it yourself only
        to read the banks through ``_buffers``. The rows are written in place when no autograd
        graph holds the banks, else into a new tensor that replaces the buffer (copy on write).
        """
        pending, self._pending = self._pending, None
        if pending is None:
            return
        idx, rows = pending
        in_use = any(r() is not None for r in self._saved_refs)
        for name, new_rows in zip(("bank_teacher", "bank_student"), rows.unbind(0)):
            bank = self._bank(name)
            if in_use:
                self._buffers[name] = bank.index_copy(0, idx, new_rows.to(bank.dtype))
            else:
                bank.index_copy_(0, idx, new_rows.to(bank.dtype))
        if in_use:
            self._saved_refs = []  # the graphs hold the old tensors, the buffers are new

    # -- reads of the banks see the last update --------------------------------------------
    def __getattr__(self, name: str) -> Any:
        if name in ("bank_student", "bank_teacher") and self.__dict__.get("_pending") is not None:
            self.flush()
        return super().__getattr__(name)

    def named_buffers(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, Tensor]]:
        self.flush()
        return super().named_buffers(*args, **kwargs)

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        self.flush()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _apply(self, fn: Any, recurse: bool = True) -> ContrastMemory:
        self.flush()
        out: ContrastMemory = super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        return out

    # -- state -------------------------------------------------------------------------------
    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        self.flush()  # a loaded state replaces the banks: write the pending rows first (in place or copied)
        # everything but the keys (torch passes strict=True here whatever the caller asked; a strict
        # load_state_dict checked them already), before anything is copied
        self.check_state(state_dict, prefix, strict=False)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        # Re-derive on the next training step: a loaded Z > 0 is kept, a loaded -1 is set again.
        self._z_known = False
        if hasattr(self, "labels") and isinstance(getattr(self, "labels", None), Tensor):
            self._build_class_tables()

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """:meth:`torch.nn.Module.load_state_dict`, after :meth:`check_state`: a refused state changes nothing."""
        self.check_state(state_dict, strict=strict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def check_state(self, state_dict: Mapping[str, Any], prefix: str = "", *, strict: bool = True) -> None:
        """Raise unless ``state_dict`` (keys under ``prefix``) can be loaded into this memory as a whole.

        Checked before :meth:`load_state_dict` copies anything, so that a refused state leaves
        the memory as it was: every buffer a tensor of this memory's shape (the banks
        ``(n_data, feat_dim)``: a checkpoint of another dataset size is refused), no missing or
        unexpected key with ``strict``, finite banks, and ``Z`` either unset (``-1``) or finite
        and positive (a poisoned state is refused, not resumed from).

        Raises:
            ShapeError: a buffer of another shape.
            TypeError: a value that is not a tensor.
            ValueError: non-finite banks, a NaN or non-positive ``Z``.
            RuntimeError: with ``strict``, missing or unexpected keys.
        """
        own = dict(self._buffers)
        persistent = {k: v for k, v in own.items() if v is not None and k not in self._non_persistent_buffers_set}
        if strict:
            missing = [prefix + k for k in persistent if prefix + k not in state_dict]
            unexpected = [
                k
                for k in state_dict
                if k.startswith(prefix) and "." not in k[len(prefix) :] and k[len(prefix) :] not in persistent
            ]
            if missing or unexpected:
                raise RuntimeError(
                    f"ContrastMemory state {prefix!r}: missing key(s) {missing}, unexpected key(s) {unexpected} "
                    "(strict=True); nothing was loaded"
                )
        for name, mine in persistent.items():
            if prefix + name not in state_dict:
                continue
            saved = state_dict[prefix + name]
            if not isinstance(saved, Tensor):
                raise TypeError(f"{prefix}{name} in the state must be a tensor, got {type(saved).__name__}")
            if saved.shape != mine.shape:
                what = " (n_data, feat_dim)" if name.startswith("bank_") else ""
                raise ShapeError(
                    f"{prefix}{name} in the checkpoint has shape {tuple(saved.shape)}{what}, this ContrastMemory has "
                    f"{tuple(mine.shape)}" + (": the dataset size does not match" if name != "normalizers" else "")
                )
            if name.startswith("bank_") and not bool(torch.isfinite(saved).all()):
                raise ValueError(
                    f"{prefix}{name} in the state holds NaN or infinite values: a poisoned memory bank is not loaded"
                )
            if name == "normalizers" and not bool(((saved == -1) | (torch.isfinite(saved) & (saved > 0))).all()):
                raise ValueError(
                    f"{prefix}normalizers (Z) in the state must be -1 (unset) or finite and > 0, got "
                    f"{saved.tolist()}: a poisoned state is not loaded"
                )

    def extra_repr(self) -> str:
        return (
            f"n_data={self.n_data}, feat_dim={self.feat_dim}, n_negatives={self.n_negatives}, "
            f"temperature={self.temperature}, momentum={self.momentum}, negatives={self.negatives!r}, "
            f"dtype={self.bank_student.dtype}, method={self.method!r}, validate={self.validate}"
        )


def _normalizer_sums(ls: Tensor, lt: Tensor, finite: Tensor) -> Tensor:
    """``(3,)`` float32: the sums of ``exp(logits)`` of both views over the ``finite`` rows, and their count."""
    keep = finite.unsqueeze(1)
    s = torch.where(keep, ls.float().exp(), 0.0).sum()
    t = torch.where(keep, lt.float().exp(), 0.0).sum()
    return torch.stack([s, t, finite.sum().float()])


def _z_from_sums(sums: Tensor, logits: Tensor, n_data: int) -> Tensor:
    """``(2,)`` ``Z = mean(exp(logits)) * n_data`` from :func:`_normalizer_sums`; ``-1`` where unusable."""
    count = sums[2]
    z = sums[:2] / (count * logits.shape[1]).clamp(min=1.0) * n_data
    usable = (count > 0) & torch.isfinite(z) & (z > 0)
    return torch.where(usable, z, -1.0)


class _SavedBank:
    """What an autograd graph saves in place of a bank tensor: alive exactly as long as the graph needs it."""

    __slots__ = ("__weakref__", "tensor")

    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor


def _unpack_saved(x: Any) -> Tensor:
    return x.tensor if isinstance(x, _SavedBank) else x  # type: ignore[no-any-return]


def _same_storage(a: Tensor, b: Tensor) -> bool:
    try:
        return bool(a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. subclasses): assume shared
        return True
