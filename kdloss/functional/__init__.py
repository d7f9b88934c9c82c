"""Pure loss functions: tensors in, tensor out. Each carries the canonical docstring of its loss."""

from kdloss.functional.attention import attention_loss, attention_map
from kdloss.functional.cohort import cohort_kd, orthogonality_penalty, paired_head_kd, self_distillation_loss, tofd_loss
from kdloss.functional.hint import cosine_hidden_loss, hint_loss
from kdloss.functional.kl import log_probs, soft_kl

__all__ = [
    "attention_loss",
    "attention_map",
    "cohort_kd",
    "cosine_hidden_loss",
    "hint_loss",
    "log_probs",
    "orthogonality_penalty",
    "paired_head_kd",
    "self_distillation_loss",
    "soft_kl",
    "tofd_loss",
]
