"""Pure loss functions: tensors in, tensor out. Each carries the canonical docstring of its loss."""

from kdloss.functional.attention import attention_loss, attention_map
from kdloss.functional.cohort import (
    cohort_kd,
    orthogonality_penalty,
    paired_head_kd,
    self_distillation_loss,
    tofd_authors_loss,
    tofd_loss,
    tofd_temperature,
)
from kdloss.functional.contrastive import (
    crd_embed,
    crd_logits,
    crd_loss,
    crd_memory_update,
    crd_nce_loss,
    crd_normalizer,
    crd_update_rows,
)
from kdloss.functional.feature import ab_loss, ft_loss, hcl_loss, vid_loss
from kdloss.functional.fused_linear import fused_linear_kd, sparse_kd
from kdloss.functional.hint import cosine_hidden_loss, hint_loss
from kdloss.functional.kd_ce import kd_ce_loss
from kdloss.functional.kl import log_probs, soft_kl
from kdloss.functional.logit import dist_loss, dkd_loss, dkd_warmup_factor
from kdloss.functional.relational import cc_loss, fsp_loss, fsp_matrix, nst_loss, pkt_loss, rkd_loss, sp_loss

__all__ = [
    "ab_loss",
    "attention_loss",
    "attention_map",
    "cc_loss",
    "cohort_kd",
    "cosine_hidden_loss",
    "crd_embed",
    "crd_logits",
    "crd_loss",
    "crd_memory_update",
    "crd_nce_loss",
    "crd_normalizer",
    "crd_update_rows",
    "dist_loss",
    "dkd_loss",
    "dkd_warmup_factor",
    "fsp_loss",
    "fsp_matrix",
    "ft_loss",
    "fused_linear_kd",
    "hcl_loss",
    "hint_loss",
    "kd_ce_loss",
    "log_probs",
    "nst_loss",
    "orthogonality_penalty",
    "paired_head_kd",
    "pkt_loss",
    "rkd_loss",
    "self_distillation_loss",
    "soft_kl",
    "sp_loss",
    "sparse_kd",
    "tofd_authors_loss",
    "tofd_loss",
    "tofd_temperature",
    "vid_loss",
]
