"""Models of the reference trainers.

Every model is a plain ``nn.Module`` whose ``forward`` returns logits; recipes read intermediate
features with :class:`kdloss.FeatureTap` instead of changing the model.
"""

from reference_trainers.models.small import SmallCNN
from reference_trainers.models.tutorial import DeepNN, LightNN, count_parameters

__all__ = ["DeepNN", "LightNN", "SmallCNN", "count_parameters"]
