"""Keep a teacher frozen: eval mode, no gradients, even when a parent module calls ``.train()``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["FrozenTeacher"]


class FrozenTeacher(nn.Module):
    """Wrap a teacher so that it stays in eval mode and never builds a graph.

    ``model.train()`` on a parent module (a distillation wrapper holding student and teacher)
    recursively switches every child back to training mode, re-enabling dropout and letting
    BatchNorm update its running statistics from the student's batches. This wrapper ignores
    that: :meth:`train` always leaves the teacher in eval mode, every parameter has
    ``requires_grad=False``, and :meth:`forward` runs under ``torch.no_grad()``.

    The wrapped model is ``self.module``, so ``state_dict`` keys gain a ``module.`` prefix: load a
    plain teacher checkpoint with ``teacher.module.load_state_dict(...)``. :class:`kdloss.FeatureTap`
    unwraps it (paths need no ``module.`` prefix). Its outputs carry no graph, so they can be
    used directly as targets.

    Args:
        module: the trained teacher.

    Raises:
        TypeError: if ``module`` is not an ``nn.Module``.

    Example:
        >>> import torch
        >>> teacher = FrozenTeacher(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5)))
        >>> parent = torch.nn.ModuleDict({"teacher": teacher})
        >>> _ = parent.train()
        >>> teacher.training, teacher.module.training, teacher(torch.ones(1, 4)).requires_grad
        (False, False, False)
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        self.module = module
        self.module.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenTeacher:
        """Stay in eval mode whatever ``mode`` is."""
        return super().train(False)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the teacher in eval mode without building a graph.

        A submodule switched back to training mode from outside (``teacher.module.train()``)
        is put back in eval mode first.
        """
        if not torch.compiler.is_compiling() and any(m.training for m in self.module.modules()):
            self.module.train(False)
        with torch.no_grad():
            return self.module(*args, **kwargs)
