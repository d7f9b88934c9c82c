"""The student side of a run: :class:`DistillStep`, the base class every method's step derives from."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

import kdloss

__all__ = ["DistillStep"]


class DistillStep(nn.Module):
    """Base class of a method's student side: the trained modules and the loss of one step.

    Subclasses set ``self.student`` (the model that is evaluated and reported) and any extra
    trainable or stateful modules as attributes (they are then in ``parameters()``, the DDP
    wrapper and the checkpoint), and implement :meth:`forward`. The teacher is never a
    submodule: its outputs come in through ``teacher``.

    Steps that need each sample's index in the training split (a memory bank: CRD) set the class
    attribute ``needs_index = True``; the engine then calls ``forward(images, labels, teacher,
    index=index)`` with ``index (B,)`` int64 on the device: the rows of the training split the
    batch sources number from 0 to ``data.train.num_samples - 1`` (the split actually trained on,
    after a validation split is carved out; the same numbering as the teacher cache; under DDP each
    rank gets its shard's indices into the whole split). Other steps are called as before.

    Buffers that the step keeps identical on every rank itself (CRD's banks, updated from
    all-gathered embeddings) are named by :meth:`ddp_unsynced_buffers`: DDP does not broadcast
    them from rank 0 (``check_ranks_agree`` still compares them at the end of a run).
    """

    student: nn.Module
    needs_index: bool = False

    def forward(self, images: Tensor, labels: Tensor, teacher: dict[str, Tensor] | None) -> kdloss.LossParts:
        """Return the step's loss: ``LossParts(total, parts)`` with named, detached parts."""
        raise NotImplementedError

    def ddp_unsynced_buffers(self) -> list[str]:
        """Names (``named_buffers`` keys) of buffers DDP must not broadcast from rank 0 (default: none)."""
        return []

    def signature(self) -> dict[str, Any]:
        """What a checkpoint must match: the step's class and every state tensor's shape."""
        return {
            "class": type(self).__name__,
            "student": type(self.student).__name__,
            "shapes": {k: list(v.shape) for k, v in self.state_dict().items()},
        }
