"""Count the aten operators a call dispatches, forward and backward: a deterministic proxy for eager cost.

Every operator a loss runs in eager mode is one dispatch through ATen (and on a GPU, most are one
kernel launch each), so at small sizes, where the host's issue time dominates, the count is the
time. Unlike a timing, the count is the same on every run and every machine, so tests can assert
it (``tests/test_op_counts.py``) and benchmarks can report it beside their timings.

Usage::

    from tests.opcount import count_ops
    n = count_ops(lambda: loss_fn(s, t), grad_of=[s]).total
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["OpCount", "count_ops"]


class _Counter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


@dataclass
class OpCount:
    """Operators dispatched by the forward call and by its backward pass, by name."""

    forward: Counter[str] = field(default_factory=Counter)
    backward: Counter[str] = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.forward.values()) + sum(self.backward.values())

    def summary(self) -> str:
        both = self.forward + self.backward
        return f"{self.total} ops ({sum(self.forward.values())} forward): " + ", ".join(
            f"{k} x{v}" for k, v in both.most_common()
        )


def count_ops(fn: Callable[[], Tensor], grad_of: Sequence[Tensor] = ()) -> OpCount:
    """The operators ``fn()`` dispatches, then those of ``torch.autograd.grad(fn(), grad_of)`` (if any).

    The backward pass runs in this thread for CPU and meta tensors, inside the same mode, so its
    operators are counted too (the gradient's seed ``ones_like`` included).
    """
    out = OpCount()
    with _Counter() as fwd:
        loss = fn()
    out.forward = fwd.ops
    if grad_of:
        with _Counter() as bwd:
            torch.autograd.grad(loss, list(grad_of), allow_unused=True)
        out.backward = bwd.ops
    return out


def leaves(*tensors: Tensor) -> list[Tensor]:
    """Fresh leaf copies that require grad (so that counting never touches the caller's tensors)."""
    return [t.detach().clone().requires_grad_(True) for t in tensors]
