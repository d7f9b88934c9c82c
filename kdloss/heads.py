"""Deprecated: the intermediate heads moved to :mod:`kdloss.parts.heads`; every name is also in :mod:`kdloss`.

This module re-exports the names it had, for imports (and pickles) of earlier versions; it will be
removed in a later release.
"""

from __future__ import annotations

import warnings

from kdloss.parts.heads import (
    ClassifierHead,
    FinetuneResult,
    HeadsOutput,
    HeadType,
    IntermediateHeads,
    evaluate_heads,
    finetune_heads,
)

__all__ = [
    "ClassifierHead",
    "FinetuneResult",
    "HeadType",
    "HeadsOutput",
    "IntermediateHeads",
    "evaluate_heads",
    "finetune_heads",
]

warnings.warn("kdloss.heads is deprecated: import from kdloss (or kdloss.parts.heads)", FutureWarning, stacklevel=2)
