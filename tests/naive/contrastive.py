"""Plain textbook CRD (Tian, Krishnan & Isola, ICLR 2020), written from the formulas, in the reference style.

Everything is deliberately naive: the ``(B, K+1, d)`` bank rows are gathered and multiplied with
``bmm``, ``exp(s / tau) / Z`` is formed explicitly, the NCE loss follows the formula literally,
negatives are sampled on the CPU per sample. It is the parity reference of ``tests/test_crd.py``
and the baseline of ``benchmarks/test_bench_crd.py``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn


def naive_normalize(x: Tensor) -> Tensor:
    return x / x.pow(2).sum(1, keepdim=True).pow(0.5)


class NaiveEmbed(nn.Module):
    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return naive_normalize(self.linear(x.view(x.shape[0], -1)))


def naive_init_bank(n_data: int, feat_dim: int) -> Tensor:
    stdv = 1.0 / math.sqrt(feat_dim / 3)
    return torch.rand(n_data, feat_dim).mul_(2 * stdv).add_(-stdv)


def naive_exp_scores(v: Tensor, bank: Tensor, idx: Tensor, temperature: float) -> Tensor:
    """exp(<v, w_idx> / tau) via the materialised (B, K+1, d) gather and bmm."""
    weight = bank[idx.view(-1)].view(idx.shape[0], idx.shape[1], bank.shape[1])
    out = torch.bmm(weight, v.view(v.shape[0], -1, 1)).squeeze(2)
    return torch.exp(out / temperature)


def naive_nce(x: Tensor, n_data: int) -> Tensor:
    """-[log(P_pos/(P_pos + K/n)) + sum_neg log((K/n)/(P_neg + K/n))] / B, with x = P (already / Z)."""
    bsz, m = x.shape[0], x.shape[1] - 1
    pn = 1.0 / n_data
    p_pos = x[:, 0]
    log_d1 = torch.log(p_pos / (p_pos + m * pn))
    p_neg = x[:, 1:]
    log_d0 = torch.log((m * pn) / (p_neg + m * pn))
    return -(log_d1.sum() + log_d0.sum()) / bsz


def naive_update(bank: Tensor, idx: Tensor, emb: Tensor, momentum: float) -> None:
    """In place: old rows read first, new rows written one by one in batch order (last wins)."""
    with torch.no_grad():
        old = bank[idx].clone()
        new = naive_normalize(old * momentum + emb.detach() * (1 - momentum))
        for i in range(idx.shape[0]):
            bank[int(idx[i])] = new[i]


class NaiveCRD(nn.Module):
    """Reference-style CRD: two heads, two banks, Z from the first batch, gather + bmm scoring."""

    def __init__(
        self,
        s_dim: int,
        t_dim: int,
        n_data: int,
        feat_dim: int,
        k: int,
        temperature: float = 0.07,
        momentum: float = 0.5,
        update: str = "loop",
    ) -> None:
        super().__init__()
        self.embed_s = NaiveEmbed(s_dim, feat_dim)
        self.embed_t = NaiveEmbed(t_dim, feat_dim)
        self.register_buffer("memory_v1", naive_init_bank(n_data, feat_dim))  # student bank
        self.register_buffer("memory_v2", naive_init_bank(n_data, feat_dim))  # teacher bank
        self.n_data, self.k, self.temperature, self.momentum = n_data, k, temperature, momentum
        self.update = update  # "loop": sequential textbook writes; "index_copy": the reference's one call
        self.z_v1 = -1.0
        self.z_v2 = -1.0

    def forward(self, f_s: Tensor, f_t: Tensor, idx: Tensor, contrast_idx: Tensor) -> Tensor:
        v1 = self.embed_s(f_s)
        v2 = self.embed_t(f_t.detach())
        full_idx = torch.cat([idx.view(-1, 1), contrast_idx], 1)
        # the gather copies the rows, so the in-place update below cannot affect the backward pass
        out_v1 = naive_exp_scores(v1, self.memory_v2, full_idx, self.temperature)  # student vs teacher bank
        out_v2 = naive_exp_scores(v2, self.memory_v1, full_idx, self.temperature)  # teacher vs student bank
        if self.z_v1 < 0:
            self.z_v1 = float(out_v1.mean().detach()) * self.n_data
        if self.z_v2 < 0:
            self.z_v2 = float(out_v2.mean().detach()) * self.n_data
        loss = naive_nce(out_v1 / self.z_v1, self.n_data) + naive_nce(out_v2 / self.z_v2, self.n_data)
        if self.update == "loop":
            naive_update(self.memory_v1, idx, v1, self.momentum)
            naive_update(self.memory_v2, idx, v2, self.momentum)
        else:
            with torch.no_grad():
                for bank, v in ((self.memory_v1, v1), (self.memory_v2, v2)):
                    rows = naive_normalize(bank[idx] * self.momentum + v.detach() * (1 - self.momentum))
                    bank.index_copy_(0, idx, rows)
        return loss


def cpu_sample_negatives(
    targets: Tensor, labels: np.ndarray | None, n_data: int, k: int, rng: np.random.Generator
) -> Tensor:
    """The reference data loader's per-sample CPU sampling (uniform, or other classes when ``labels``)."""
    out = np.empty((targets.shape[0], k), dtype=np.int64)
    for i, y in enumerate(targets.tolist()):
        if labels is None:
            out[i] = rng.integers(0, n_data, k)
        else:
            pool = np.flatnonzero(labels != y)
            out[i] = rng.choice(pool, k, replace=len(pool) < k)
    return torch.from_numpy(out)
