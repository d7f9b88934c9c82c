"""Deprecated: CRD's memory bank moved to :mod:`kdloss.parts.contrastive`; every name is also in :mod:`kdloss`.

This module re-exports the names it had, for imports (and pickles) of earlier versions; it will be
removed in a later release.
"""

from __future__ import annotations

import warnings

from kdloss.parts.contrastive import ContrastMemory, NegativeSampling

__all__ = ["ContrastMemory", "NegativeSampling"]

warnings.warn(
    "kdloss.memory is deprecated: import from kdloss (or kdloss.parts.contrastive)", FutureWarning, stacklevel=2
)
