"""The recipes: one module per documented experiment, registered in :data:`RECIPES`.

A recipe module defines ``NAME`` (the CLI sub-command), ``HELP`` (one line),
``add_arguments(parser)`` (its own options, after the common ones of
:func:`reference_trainers.recipes.common.add_common_arguments`) and ``run(args) -> int`` (the
exit code). To add one: write ``recipes/<name>.py`` and append its module to ``RECIPES`` below.
"""

from __future__ import annotations

from types import ModuleType

from reference_trainers.recipes import (
    benchmark_cifar100,
    blog_cifar10,
    demo,
    dih,
    hint_imagenette,
    lm_distil,
    tutorial_cifar10,
)

__all__ = ["RECIPES"]

RECIPES: dict[str, ModuleType] = {m.NAME: m for m in (demo, tutorial_cifar10)}
RECIPES.update({m.NAME: m for m in (hint_imagenette, dih, blog_cifar10, benchmark_cifar100)})
RECIPES[lm_distil.NAME] = lm_distil
