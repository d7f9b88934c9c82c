"""kdloss: typed, tested knowledge-distillation losses for PyTorch.

Modules (stateless ``nn.Module`` losses, adapters, :class:`FeatureTap`) are importable from
``kdloss``; the pure functions from :mod:`kdloss.functional`.
"""

from kdloss._validate import Reduction, ShapeError
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
    FusedLinearKDLoss,
    HCLLoss,
    HintLoss,
    KDCELoss,
    KDLoss,
    NSTLoss,
    PKTLoss,
    RKDLoss,
    SparseKDLoss,
    SPLoss,
    VIDLoss,
)
from kdloss.losses.cohort import CohortLoss, MultiHeadKDLoss, SelfDistillationLoss, TOFDAuthorsLoss, TOFDLoss
from kdloss.losses.contrastive import CRDLoss
from kdloss.parts.adapters import (
    Adapter,
    ConvAdapter,
    LinearAdapter,
    PoolAdapter,
    adapter_for,
    adapter_parameters,
    check_optimizer,
)
from kdloss.parts.contrastive import ContrastMemory, CRDEmbed
from kdloss.parts.feature import ABConnector, FTParaphraser, FTTranslator, ReviewKDFusion, VIDRegressor
from kdloss.parts.fused_linear import TeacherTopK
from kdloss.parts.heads import (
    ClassifierHead,
    FinetuneResult,
    HeadsOutput,
    IntermediateHeads,
    evaluate_heads,
    finetune_heads,
)
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
    "ClassifierHead",
    "CohortLoss",
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
    "FinetuneResult",
    "FrozenTeacher",
    "FusedLinearKDLoss",
    "HCLLoss",
    "HeadsOutput",
    "HintLoss",
    "IntermediateHeads",
    "KDCELoss",
    "KDLoss",
    "LinearAdapter",
    "LossParts",
    "MultiHeadKDLoss",
    "NSTLoss",
    "PKTLoss",
    "PoolAdapter",
    "RKDLoss",
    "Reduction",
    "ReviewKDFusion",
    "SPLoss",
    "SelfDistillationLoss",
    "ShapeError",
    "SparseKDLoss",
    "TOFDAuthorsLoss",
    "TOFDLoss",
    "TeacherTopK",
    "VIDLoss",
    "VIDRegressor",
    "WeightedSum",
    "__version__",
    "adapter_for",
    "adapter_parameters",
    "check_optimizer",
    "evaluate_heads",
    "finetune_heads",
    "unwrap_model",
    "weighted_sum",
]
