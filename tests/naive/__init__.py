"""Textbook references of the losses, one module per :mod:`kdloss.functional` family, written in float64 from
the papers and the reference implementations' formulas: plain loops and sums, no masking tricks, no numerical
care beyond the source's. Also the baselines of ``benchmarks/``. Every function is re-exported here, as
:mod:`kdloss.functional` does."""

from __future__ import annotations

from tests.naive.attention import (
    at_loss,
    at_loss_pool_features,
    at_loss_pool_maps,
    at_loss_pooled,
    at_loss_repdistiller,
    at_map,
)
from tests.naive.cohort import (
    cohort_kl_div,
    cohort_loop,
    dih_per_head_alphas,
    kd_loss_dih,
    mhkd_authors,
    orthogonality,
    orthogonality_authors,
    paired_loop,
    self_distillation_loop,
    tofd_authors,
)
from tests.naive.contrastive import (
    NaiveCRD,
    NaiveEmbed,
    cpu_sample_negatives,
    naive_exp_scores,
    naive_init_bank,
    naive_nce,
    naive_normalize,
    naive_update,
)
from tests.naive.feature import ab, ft, ft_repdistiller, ft_repdistiller_any_size, hcl, vid
from tests.naive.fused_linear import divergence_rows, lm_kd, lm_kl_div, sparse_kd
from tests.naive.hint import cosine_hidden, hint_mse
from tests.naive.kd_ce import kd_ce
from tests.naive.kl import jsd, kd_kl_div, kd_tutorial, kl_rows, reverse_kl
from tests.naive.logit import dist, dkd, dkd_mdistiller, kd_per_row, pearson
from tests.naive.relational import (
    cc,
    cc_rbf_exact,
    cc_repdistiller,
    fsp,
    fsp_matrix,
    huber,
    nst,
    pkt,
    pkt_repdistiller,
    rkd,
    sp,
)

__all__ = [
    "NaiveCRD",
    "NaiveEmbed",
    "ab",
    "at_loss",
    "at_loss_pool_features",
    "at_loss_pool_maps",
    "at_loss_pooled",
    "at_loss_repdistiller",
    "at_map",
    "cc",
    "cc_rbf_exact",
    "cc_repdistiller",
    "cohort_kl_div",
    "cohort_loop",
    "cosine_hidden",
    "cpu_sample_negatives",
    "dih_per_head_alphas",
    "dist",
    "divergence_rows",
    "dkd",
    "dkd_mdistiller",
    "fsp",
    "fsp_matrix",
    "ft",
    "ft_repdistiller",
    "ft_repdistiller_any_size",
    "hcl",
    "hint_mse",
    "huber",
    "jsd",
    "kd_ce",
    "kd_kl_div",
    "kd_loss_dih",
    "kd_per_row",
    "kd_tutorial",
    "kl_rows",
    "lm_kd",
    "lm_kl_div",
    "mhkd_authors",
    "naive_exp_scores",
    "naive_init_bank",
    "naive_nce",
    "naive_normalize",
    "naive_update",
    "nst",
    "orthogonality",
    "orthogonality_authors",
    "paired_loop",
    "pearson",
    "pkt",
    "pkt_repdistiller",
    "reverse_kl",
    "rkd",
    "self_distillation_loop",
    "sp",
    "sparse_kd",
    "tofd_authors",
    "vid",
]
