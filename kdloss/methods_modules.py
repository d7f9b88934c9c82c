"""Deprecated: the feature methods' trainable parts moved to :mod:`kdloss.parts.feature` (and are in :mod:`kdloss`).

This module re-exports the names it had, for imports (and pickles) of earlier versions; it will be
removed in a later release.
"""

from __future__ import annotations

import warnings

from kdloss.parts.feature import ABConnector, FTParaphraser, FTTranslator, ReviewKDFusion, VIDRegressor

__all__ = ["ABConnector", "FTParaphraser", "FTTranslator", "ReviewKDFusion", "VIDRegressor"]

warnings.warn(
    "kdloss.methods_modules is deprecated: import from kdloss (or kdloss.parts.feature)", FutureWarning, stacklevel=2
)
