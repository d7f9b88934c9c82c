"""Contrastive representation distillation as one module: embedding heads + memory banks + NCE."""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from kdloss._numerics import detached
from kdloss._validate import ShapeError, check_positive_int
from kdloss.functional.contrastive import crd_loss
from kdloss.parts.contrastive import ContrastMemory, CRDEmbed

# ContrastMemory's own default embedding width: CRDLoss sizes its heads before it builds the
# memory (the order that fixes the random initialisation), without restating the default.
_FEAT_DIM: int = inspect.signature(ContrastMemory).parameters["feat_dim"].default

__all__ = ["CRDEmbed", "CRDLoss", "check_negatives_fit"]  # CRDEmbed: its home is kdloss.parts.contrastive


def check_negatives_fit(n_negatives: int, n_data: int) -> None:
    """Raise a ``ValueError`` unless ``0 < n_negatives < n_data``: each sample's ``K`` negatives come
    from the other ``n_data - 1`` rows of the memory bank.

    With ``K >= N`` every negative set repeats rows (and contains the anchor's own row), and the
    NCE noise ratio ``K / N`` passes 1, which CRD's estimator was not designed for. RepDistiller
    uses ``K = 16384`` for CIFAR-100's ``N = 50000``, about a third of the rows.

    Example:
        >>> check_negatives_fit(16384, 50000)
        >>> check_negatives_fit(16384, 5000)
        Traceback (most recent call last):
        ...
        ValueError: n_negatives must be smaller than n_data (the dataset size, 5000): got n_negatives=16384; ...
    """
    check_positive_int("n_data", n_data)
    check_positive_int("n_negatives", n_negatives)
    if n_negatives >= n_data:
        raise ValueError(
            f"n_negatives must be smaller than n_data (the dataset size, {n_data}): got n_negatives={n_negatives}; "
            f"each sample's negatives come from the other {n_data - 1} rows. Choose at most {n_data - 1}, "
            f"e.g. about n_data // 3 = {max(1, n_data // 3)} (RepDistiller: 16384 of 50000)"
        )


class CRDLoss(nn.Module):
    r"""Contrastive representation distillation (Tian, Krishnan & Isola, ICLR 2020), the whole method.

    .. math::

        \mathcal{L}_{\mathrm{CRD}} = \mathcal{L}_{\mathrm{NCE}}(s^{S \to T\text{-bank}})
            + \mathcal{L}_{\mathrm{NCE}}(s^{T \to S\text{-bank}})

    with the per-view NCE loss of :func:`kdloss.functional.crd_nce_loss`, the logits of
    :func:`kdloss.functional.crd_logits` and the normalisers :math:`Z` fixed from the first batch.
    :meth:`forward` is three calls: the two embedding heads, the memory
    (:meth:`kdloss.ContrastMemory.score`: both views' logits and its :math:`Z`), and
    :func:`kdloss.functional.crd_loss`.

    Unlike the stateless losses, this module owns state, as named submodules:

    - ``embed_student``, ``embed_teacher``: :class:`CRDEmbed` heads (trainable parameters: give
      them to the optimiser, e.g. ``list(student.parameters()) + list(crd.parameters())``;
      the memory has no parameters);
    - ``memory``: a :class:`kdloss.ContrastMemory` (the two banks, ``Z``, the sampler; buffers).

    The loss arithmetic itself is in :mod:`kdloss.functional.contrastive`. Teacher features are
    detached (the teacher head still learns). The banks are updated in training mode only
    (``crd.train()``), after scoring, like batch-norm statistics. In evaluation mode before any
    training step (and with no loaded :math:`Z`), :math:`Z` is taken from the current batch, not stored.

    The data loader must supply each sample's dataset index (``indices``), e.g. a ``Dataset``
    wrapper returning ``(x, y, index)``; see ``docs/crd.md``, which also covers DDP.

    Faults: a sample whose features give a NaN or infinite embedding is kept out of the banks
    and of :math:`Z` (counted in ``memory.skipped_rows``, warned once with ``validate=True``);
    the step's loss is NaN, as its input was, and later steps are unaffected. An empty first
    batch leaves :math:`Z` unset for the next batch. Features in float16 or bfloat16 outside
    autocast are embedded in the heads' dtype (float32 by default). ``load_state_dict`` checks
    the whole state (shapes, keys with ``strict``, finite banks and :math:`Z`) before it copies
    anything: a refused state leaves the module as it was.

    Args:
        student_dim: flattened width of the student features.
        teacher_dim: flattened width of the teacher features.
        n_data: dataset size (bank rows); omit it when passing ``memory``.
        feat_dim: embedding width (the memory's: 128 unless given).
        memory: a :class:`kdloss.ContrastMemory` to use (its ``n_data``, ``feat_dim``, ``n_negatives``,
            temperature, momentum, sampling...); or none, and the memory is built from ``n_data``,
            ``feat_dim`` and ``memory_options``.
        bank_dtype: the banks' dtype, the memory's ``dtype`` (float32 or bfloat16; the name of
            earlier versions, kept).
        **memory_options: :class:`kdloss.ContrastMemory`'s keyword arguments and defaults, e.g.
            ``n_negatives`` (:math:`K`, 16384, RepDistiller's for CIFAR-100's 50,000 images; must be
            smaller than ``n_data``, see ``docs/crd.md`` for choosing :math:`K` on small data),
            ``temperature`` (:math:`\tau`, 0.07), ``momentum`` (0.5), ``negatives``
            (``"uniform"`` or ``"class"``), ``labels``, ``replacement``, ``method``, ``chunk_size``,
            ``validate``, ``process_group``.

    Shape:
        ``(B, *), (B, *), (B,) -> ()`` float32.

    Raises:
        ValueError: a bad configuration (here), among them ``n_negatives >= n_data``; class
            mode without labels; indices outside the bank (in :meth:`forward`, before any state
            changes); a poisoned state in ``load_state_dict``.
        ShapeError: a wrong feature width or mismatched batch sizes.
        TypeError: non-float features or non-integer indices.

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> crd = CRDLoss(16, 32, n_data=100, feat_dim=8, n_negatives=20)
        >>> loss = crd(torch.randn(4, 16), torch.randn(4, 32), torch.tensor([3, 14, 15, 92]))
        >>> loss.shape, bool(loss > 0)
        (torch.Size([]), True)
    """

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        n_data: int | None = None,
        *,
        feat_dim: int | None = None,
        memory: ContrastMemory | None = None,
        bank_dtype: torch.dtype | None = None,
        **memory_options: Any,
    ) -> None:
        super().__init__()
        if memory is not None:
            if not isinstance(memory, ContrastMemory):
                raise TypeError(f"memory must be a kdloss.ContrastMemory, got {type(memory).__name__}")
            extra = sorted(memory_options) + (["bank_dtype"] if bank_dtype is not None else [])
            if extra:
                raise ValueError(f"pass the memory's settings {extra} to the ContrastMemory, not with memory=")
            for name, given, own in (("n_data", n_data, memory.n_data), ("feat_dim", feat_dim, memory.feat_dim)):
                if given is not None and given != own:
                    raise ValueError(f"{name}={given} differs from the memory's {name}={own}; omit it or match it")
            feat_dim = memory.feat_dim
        elif n_data is None:
            raise ValueError("CRDLoss needs n_data (the dataset size, the banks' rows) or a memory= to use")
        if bank_dtype is not None:
            if "dtype" in memory_options:
                raise ValueError("pass the banks' dtype once: dtype= or bank_dtype=, not both")
            memory_options["dtype"] = bank_dtype
        width = _FEAT_DIM if feat_dim is None else feat_dim
        self.embed_student = CRDEmbed(student_dim, width)
        self.embed_teacher = CRDEmbed(teacher_dim, width)
        if memory is None:
            if feat_dim is not None:
                memory_options["feat_dim"] = feat_dim
            memory = ContrastMemory(n_data, **memory_options)  # type: ignore[arg-type]  # checked above
        self.memory = memory
        check_negatives_fit(memory.n_negatives, memory.n_data)  # after the memory's own checks of n_data, labels, ...

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
        # Called before the submodules load: check the whole state first, so that a refused one
        # (another n_data, a poisoned bank) leaves the heads and the memory untouched. (Keys: torch
        # passes strict=True here whatever the caller asked; load_state_dict checks them.)
        self._check_state(state_dict, prefix, strict=False)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """:meth:`torch.nn.Module.load_state_dict`, with every check first: a refused state changes nothing.

        Checked before anything is copied: the shapes (a checkpoint of another ``n_data`` or
        feature width), with ``strict`` missing and unexpected keys, finite banks and ``Z``.

        Raises:
            ShapeError: a tensor of another shape. TypeError: a value that is not a tensor.
            ValueError: non-finite banks or ``Z``. RuntimeError: with ``strict``, missing or
            unexpected keys.
        """
        self._check_state(state_dict, "", strict=strict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _check_state(self, state_dict: Mapping[str, Any], prefix: str, *, strict: bool) -> None:
        self.memory.check_state(state_dict, prefix + "memory.", strict=False)
        expected = {prefix + k: v for k, v in self.state_dict(keep_vars=True).items()}
        if strict:
            missing = [k for k in expected if k not in state_dict]
            unexpected = [k for k in state_dict if k.startswith(prefix) and k not in expected]
            if missing or unexpected:
                raise RuntimeError(
                    f"CRDLoss state: missing key(s) {missing}, unexpected key(s) {unexpected} "
                    "(strict=True); nothing was loaded"
                )
        for key, mine in expected.items():
            saved = state_dict.get(key)
            if saved is None:
                continue
            if not isinstance(saved, Tensor):
                raise TypeError(f"{key} in the state must be a tensor, got {type(saved).__name__}")
            if saved.shape != mine.shape:
                raise ShapeError(
                    f"{key} in the state has shape {tuple(saved.shape)}, this CRDLoss has {tuple(mine.shape)}; "
                    "nothing was loaded"
                )

    def forward(
        self,
        student_features: Tensor,
        teacher_features: Tensor,
        indices: Tensor,
        *,
        negatives: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """One CRD step: embed, sample, score, loss; updates the banks in training mode.

        Args:
            student_features: ``(B, *)`` student features (flattened to ``student_dim``).
            teacher_features: ``(B, *)`` teacher features (flattened to ``teacher_dim``); detached.
            indices: ``(B,)`` dataset indices of the samples.
            negatives: optional ``(B, n_negatives)`` negative indices (sampled when ``None``).
            generator: optional generator for the sampling.
        """
        for name, feats, head in (
            ("student_features", student_features, self.embed_student),
            ("teacher_features", teacher_features, self.embed_teacher),
        ):
            width = head.linear.in_features
            if not isinstance(feats, Tensor) or feats.ndim < 2 or math.prod(feats.shape[1:]) != width:
                shape = tuple(feats.shape) if isinstance(feats, Tensor) else type(feats).__name__
                raise ShapeError(f"{name} must be (B, ...) with {width} features per sample, got shape {shape}")
        v_s = self.embed_student(student_features)
        v_t = self.embed_teacher(detached(teacher_features))
        scores = self.memory.score(v_s, v_t, indices, negatives, generator=generator)
        return crd_loss(*scores, self.memory.n_data)
