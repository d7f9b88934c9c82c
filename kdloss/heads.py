"""Deprecated: the intermediate heads moved to :mod:`kdloss.parts.heads`; every name is also in :mod:`kdloss`.

This module re-exports the names it had, for imports (and pickles) of earlier versions; it will be
removed in a later release.
"""

from __future__ import annotations

from kdloss._validate import deprecated_module
from kdloss.parts import heads

__all__, __getattr__, __dir__ = deprecated_module(__name__, heads)
