"""kdloss: typed, tested knowledge-distillation losses for PyTorch.

Modules (stateless ``nn.Module`` losses, adapters, :class:`FeatureTap`) are importable from
``kdloss``; the pure functions from :mod:`kdloss.functional`.
"""

from kdloss._validate import Reduction, ShapeError
from kdloss.adapters import (
    Adapter,
    ConvAdapter,
    LinearAdapter,
    PoolAdapter,
    adapter_for,
    adapter_parameters,
    check_optimizer,
)
from kdloss.compose import LossParts, WeightedSum, weighted_sum
from kdloss.losses import (
    ABLoss,
    AttentionLoss,
    CCLoss,
    CosineHiddenLoss,
    DISTLoss,
    DKDLoss,
    FSPLoss,
    FTLoss,
    HCLLoss,
    HintLoss,
    KDLoss,
    NSTLoss,
    PKTLoss,
    RKDLoss,
    SPLoss,
    VIDLoss,
)
from kdloss.losses.contrastive import CRDEmbed, CRDLoss
from kdloss.memory import ContrastMemory
from kdloss.methods_modules import ABConnector, FTParaphraser, FTTranslator, ReviewKDFusion, VIDRegressor
from kdloss.tap import FeatureTap, unwrap_model
from kdloss.teacher import FrozenTeacher

__version__ = "0.1.0"

__all__ = [
    "ABConnector",
    "ABLoss",
    "Adapter",
    "AttentionLoss",
    "CCLoss",
    "CRDEmbed",
    "CRDLoss",
    "ContrastMemory",
    "ConvAdapter",
    "CosineHiddenLoss",
    "DISTLoss",
    "DKDLoss",
    "FSPLoss",
    "FTLoss",
    "FTParaphraser",
    "FTTranslator",
    "FeatureTap",
    "FrozenTeacher",
    "HCLLoss",
    "HintLoss",
    "KDLoss",
    "LinearAdapter",
    "LossParts",
    "NSTLoss",
    "PKTLoss",
    "PoolAdapter",
    "RKDLoss",
    "Reduction",
    "ReviewKDFusion",
    "SPLoss",
    "ShapeError",
    "VIDLoss",
    "VIDRegressor",
    "WeightedSum",
    "__version__",
    "adapter_for",
    "adapter_parameters",
    "check_optimizer",
    "unwrap_model",
    "weighted_sum",
]
