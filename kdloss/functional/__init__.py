"""Pure loss functions: tensors in, tensor out. Each carries the canonical docstring of its loss."""

from kdloss.functional.attention import attention_loss, attention_map
from kdloss.functional.contrastive import (
    crd_embed,
    crd_logits,
    crd_memory_update,
    crd_nce_loss,
    crd_normalizer,
    crd_update_rows,
)
from kdloss.functional.hint import cosine_hidden_loss, hint_loss
from kdloss.functional.kl import log_probs, soft_kl

__all__ = [
    "attention_loss",
    "attention_map",
    "cosine_hidden_loss",
    "crd_embed",
    "crd_logits",
    "crd_memory_update",
    "crd_nce_loss",
    "crd_normalizer",
    "crd_update_rows",
    "hint_loss",
    "log_probs",
    "soft_kl",
]
