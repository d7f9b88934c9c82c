"""Pure loss functions: tensors in, tensor out. Each carries the canonical docstring of its loss."""

from kdloss.functional.attention import attention_loss, attention_map
from kdloss.functional.hint import cosine_hidden_loss, hint_loss
from kdloss.functional.kd_ce import kd_ce_loss
from kdloss.functional.kl import log_probs, soft_kl

__all__ = [
    "attention_loss",
    "attention_map",
    "cosine_hidden_loss",
    "hint_loss",
    "kd_ce_loss",
    "log_probs",
    "soft_kl",
]
