"""Deprecated: the adapters moved to :mod:`kdloss.parts.adapters`; every name is also in :mod:`kdloss`.

This module re-exports the names it had, for imports (and pickles) of earlier versions; it will be
removed in a later release.
"""

from __future__ import annotations

import warnings

from kdloss.parts.adapters import (
    Adapter,
    ConvAdapter,
    LinearAdapter,
    PoolAdapter,
    adapter_for,
    adapter_parameters,
    check_optimizer,
)

__all__ = [
    "Adapter",
    "ConvAdapter",
    "LinearAdapter",
    "PoolAdapter",
    "adapter_for",
    "adapter_parameters",
    "check_optimizer",
]

warnings.warn(
    "kdloss.adapters is deprecated: import from kdloss (or kdloss.parts.adapters)", FutureWarning, stacklevel=2
)
