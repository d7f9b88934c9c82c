"""No loss dispatches more aten operators, forward + backward, than its textbook formulation.

Counted with a ``TorchDispatchMode`` (``tests/opcount.py``): deterministic, so the bound is a plain
assertion, not a timing. At CIFAR sizes every operator is one kernel launch on a GPU and the host's
time to issue it is most of the cost, so the count is the eager path's cost there. The textbook
formulations are the references in ``tests/naive/`` (the usual KL forms) and
``tests/naive/reference_code.py`` (the reference implementations' code, vectorised); each is checked to
compute the same value first, so that the comparison is between two forms of one loss.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import kdloss.functional as KF
from tests import naive
from tests.naive import reference_code as ref
from tests.opcount import count_ops, leaves

B, C, T = 8, 10, 4.0


def _g() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _r(g: torch.Generator, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float32)


def _inputs() -> dict[str, object]:
    g = _g()
    return {
        "s": _r(g, B, C) * 2,
        "t": _r(g, B, C) * 2,
        "y": torch.randint(0, C, (B,), generator=g),
        "fm_s": _r(g, B, 6, 4, 4),
        "fm_t": _r(g, B, 6, 4, 4),
        "maps_s": [_r(g, B, 4, 8, 8), _r(g, B, 6, 4, 4), _r(g, B, 8, 2, 2)],
        "maps_t": [_r(g, B, 4, 8, 8), _r(g, B, 6, 4, 4), _r(g, B, 8, 2, 2)],
        "fsp_s": [_r(g, B, 4, 8, 8), _r(g, B, 6, 8, 8), _r(g, B, 8, 4, 4)],
        "fsp_t": [_r(g, B, 4, 8, 8), _r(g, B, 6, 8, 8), _r(g, B, 8, 4, 4)],
        "emb_s": _r(g, B, 12),
        "emb_t": _r(g, B, 12),
        "var": torch.rand(6, generator=g) + 0.5,
        "heads_s": _r(g, 3, B, C),
        "heads_t": _r(g, 3, B, C),
        "feats_s": [_r(g, B, 12) for _ in range(3)],
        "feat_t": _r(g, B, 12),
        "w": _r(g, 5, 7),
    }


# name -> (the tensors differentiated, kdloss's loss, the textbook loss): both take the leaves
Case = tuple[Callable[[dict[str, object]], list[Tensor]], Callable[..., Tensor], Callable[..., Tensor]]


def _logit(fn: Callable[..., Tensor], text: Callable[..., Tensor]) -> Case:
    return (lambda x: [x["s"]], fn, text)  # type: ignore[list-item]


CASES: dict[str, Case] = {
    "soft_kl": _logit(lambda x, s: KF.soft_kl(s, x["t"], temperature=T), lambda x, s: naive.kd_kl_div(s, x["t"], T)),
    "soft_kl reverse": _logit(
        lambda x, s: KF.soft_kl(s, x["t"], temperature=T, direction="reverse"),
        lambda x, s: naive.reverse_kl(s, x["t"], T),
    ),
    "soft_kl jsd": _logit(
        lambda x, s: KF.soft_kl(s, x["t"], temperature=T, direction="jsd", jsd_weight=0.5),
        lambda x, s: naive.jsd(s, x["t"], T, 0.5),
    ),
    "kd_ce_loss": _logit(
        lambda x, s: KF.kd_ce_loss(s, x["t"], x["y"], alpha=0.9, temperature=T),
        lambda x, s: naive.kd_ce(s, x["t"], x["y"], T, 0.9),
    ),
    "dkd_loss": _logit(
        lambda x, s: KF.dkd_loss(s, x["t"], x["y"], temperature=T),
        lambda x, s: ref.dkd(s, x["t"], x["y"], 1.0, 8.0, T),
    ),
    "dist_loss": _logit(
        lambda x, s: KF.dist_loss(s, x["t"], temperature=T), lambda x, s: ref.dist(s, x["t"], 1.0, 1.0, T)
    ),
    "hint_loss": (
        lambda x: [x["fm_s"]],  # type: ignore[list-item]
        lambda x, s: KF.hint_loss(s, x["fm_t"]),
        lambda x, s: naive.hint_mse(s, x["fm_t"]),
    ),
    "cosine_hidden_loss": (
        lambda x: [x["emb_s"]],  # type: ignore[list-item]
        lambda x, s: KF.cosine_hidden_loss(s, x["emb_t"]),
        lambda x, s: naive.cosine_hidden(s, x["emb_t"]),
    ),
    "attention_loss": (
        lambda x: list(x["maps_s"]),  # type: ignore[call-overload]
        lambda x, *s: KF.attention_loss(list(s), x["maps_t"]),  # type: ignore[arg-type]
        lambda x, *s: ref.at(list(s), x["maps_t"]),  # type: ignore[arg-type]
    ),
    "ft_loss": (
        lambda x: [x["fm_s"]],  # type: ignore[list-item]
        lambda x, s: KF.ft_loss(s, x["fm_t"]),
        lambda x, s: ref.ft_paper(s, x["fm_t"]),
    ),
    "ft_loss repdistiller": (
        lambda x: [x["fm_s"]],  # type: ignore[list-item]
        lambda x, s: KF.ft_loss(s, x["fm_t"], variant="repdistiller", reduction="mean"),
        lambda x, s: ref.ft_repdistiller(s, x["fm_t"]),
    ),
    "ab_loss": (
        lambda x: [x["fm_s"]],  # type: ignore[list-item]
        lambda x, s: KF.ab_loss(s, x["fm_t"]),
        lambda x, s: ref.ab(s, x["fm_t"]),
    ),
    "vid_loss": (
        lambda x: [x["fm_s"], x["var"]],  # type: ignore[list-item]
        lambda x, s, v: KF.vid_loss(s, x["fm_t"], v),
        lambda x, s, v: ref.vid(s, x["fm_t"], v),
    ),
    "hcl_loss": (
        lambda x: list(x["maps_s"]),  # type: ignore[call-overload]
        lambda x, *s: KF.hcl_loss(list(s), x["maps_t"]),  # type: ignore[arg-type]
        lambda x, *s: ref.hcl(list(s), x["maps_t"]),  # type: ignore[arg-type]
    ),
    "nst_loss": (
        lambda x: [x["fm_s"]],  # type: ignore[list-item]
        lambda x, s: KF.nst_loss(s, x["fm_t"]),
        lambda x, s: ref.nst(s, x["fm_t"]),
    ),
    "sp_loss": (
        lambda x: [x["fm_s"]],  # type: ignore[list-item]
        lambda x, s: KF.sp_loss(s, x["fm_t"]),
        lambda x, s: ref.sp(s, x["fm_t"]),
    ),
    "fsp_loss": (
        lambda x: list(x["fsp_s"]),  # type: ignore[call-overload]
        lambda x, *s: KF.fsp_loss(list(s), x["fsp_t"], variant="repdistiller"),  # type: ignore[arg-type]
        lambda x, *s: ref.fsp(list(s), x["fsp_t"]),  # type: ignore[arg-type]
    ),
    "rkd_loss": (
        lambda x: [x["emb_s"]],  # type: ignore[list-item]
        lambda x, s: KF.rkd_loss(s, x["emb_t"]),
        lambda x, s: ref.rkd(s, x["emb_t"]),
    ),
    "pkt_loss": (
        lambda x: [x["emb_s"]],  # type: ignore[list-item]
        lambda x, s: KF.pkt_loss(s, x["emb_t"]),
        lambda x, s: ref.pkt(s, x["emb_t"]),
    ),
    "cc_loss": (
        lambda x: [x["emb_s"]],  # type: ignore[list-item]
        lambda x, s: KF.cc_loss(s, x["emb_t"]),
        lambda x, s: ref.cc_paper(s, x["emb_t"]),
    ),
    "cc_loss repdistiller": (
        lambda x: [x["emb_s"]],  # type: ignore[list-item]
        lambda x, s: KF.cc_loss(s, x["emb_t"], variant="repdistiller"),
        lambda x, s: ref.cc_repdistiller(s, x["emb_t"]),
    ),
    "cohort_kd": _logit(
        lambda x, s: KF.cohort_kd(s, x["heads_t"], x["y"], temperature=T, alpha=0.1).total,  # type: ignore[arg-type]
        lambda x, s: naive.cohort_kl_div(s, list(x["heads_t"].unbind(0)), x["y"], T, 0.1),
    ),
    "paired_head_kd": (
        lambda x: [x["heads_s"]],  # type: ignore[list-item]
        lambda x, s: KF.paired_head_kd(s, x["heads_t"], x["y"], temperature=T, alpha=0.9).total,  # type: ignore[arg-type]
        lambda x, s: ref.paired_kd(s, x["heads_t"], x["y"], T, 0.9),  # type: ignore[arg-type]
    ),
    "self_distillation_loss": (
        lambda x: [x["heads_s"], x["s"], *x["feats_s"]],  # type: ignore[list-item, misc]
        lambda x, e, f, *fs: (
            KF.self_distillation_loss(
                e, f, x["y"], exit_features=list(fs), final_feature=x["feat_t"], temperature=3.0, alpha=0.3, beta=0.03
            ).total
        ),  # type: ignore[arg-type]
        lambda x, e, f, *fs: ref.self_distillation(e, f, x["y"], 3.0, 0.3, 0.03, list(fs), x["feat_t"]),  # type: ignore[arg-type]
    ),
    "orthogonality_penalty": (
        lambda x: [x["w"]],  # type: ignore[list-item]
        lambda x, w: KF.orthogonality_penalty(w),
        lambda x, w: ref.orthogonality(w),
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_no_more_operators_than_the_textbook(name: str) -> None:
    grad_of, ours, textbook = CASES[name]
    x = _inputs()
    mine, theirs = leaves(*grad_of(x)), leaves(*grad_of(x))
    # the same loss first (a cheaper formula of another loss would prove nothing)
    torch.testing.assert_close(ours(x, *mine), textbook(x, *theirs), rtol=2e-4, atol=2e-5)
    n_ours = count_ops(lambda: ours(x, *mine), mine)
    n_text = count_ops(lambda: textbook(x, *theirs), theirs)
    assert n_ours.backward
    assert n_text.backward
    assert n_ours.total <= n_text.total, f"{name}: {n_ours.summary()}\n  textbook: {n_text.summary()}"


def test_crd_step_dispatches_no_more_than_the_textbook_step() -> None:
    """One CRD training step (heads, scores against both banks, NCE, backward, bank update)."""
    from benchmarks.test_bench_crd import Bench, Size

    bench = Bench(Size(4, 8, 8, 64, 8), "cpu")
    for _ in range(2):  # past the first step (Z set, an update pending)
        bench.kdloss()
        bench.naive_step()
    ours = count_ops(bench.kdloss)
    theirs = count_ops(bench.naive_step)
    assert ours.total <= theirs.total, f"{ours.summary()}\n  textbook: {theirs.summary()}"


def test_the_counter_sees_every_operator() -> None:
    s = torch.randn(3, 4, requires_grad=True)
    n = count_ops(lambda: (s * 2.0).sum(), [s])
    assert sum(n.forward.values()) == 2
    assert n.backward["ones_like"] == 1
    assert n.backward["mul"] == 1


def test_kd_ce_backward_is_three_kernels_and_one_multiply_add() -> None:
    """KD + CE on the CPU's plain form: nll_loss's backward (the label weight folded into its divisor),
    two log-softmax backwards and one addcmul; no separate scalar or full-size multiplies."""
    x = _inputs()
    (s,) = leaves(x["s"])  # type: ignore[arg-type]
    n = count_ops(lambda: KF.kd_ce_loss(s, x["t"], x["y"], alpha=0.9, temperature=T), [s])  # type: ignore[arg-type]
    assert dict(n.backward) == {
        "ones_like": 1,
        "nll_loss_backward": 1,
        "_log_softmax_backward_data": 2,
        "addcmul_": 1,
    }, n.summary()


# -- the language-model losses: fused_linear_kd (chunked) and sparse_kd (top-k teacher) -----------------

N_TOK, H_LM, V_LM, K_TOP = 16, 8, 50, 5


def _lm() -> dict[str, Tensor]:
    g = _g()
    logits_t = _r(g, N_TOK, V_LM)
    lp, idx = torch.log_softmax(logits_t, -1).topk(K_TOP, -1)
    return {
        "h": _r(g, N_TOK, H_LM),
        "w": _r(g, V_LM, H_LM) * 0.3,
        "ht": _r(g, N_TOK, H_LM),
        "wt": _r(g, V_LM, H_LM) * 0.3,
        "y": torch.randint(0, V_LM, (N_TOK,), generator=g),
        "s": _r(g, N_TOK, V_LM),
        "lp": lp,
        "idx": idx,
    }


def _fused(x: dict[str, Tensor], h: Tensor, w: Tensor, chunk: int, hard: float) -> Tensor:
    y = x["y"] if hard else None
    return KF.fused_linear_kd(h, w, x["ht"], x["wt"], y, temperature=T, hard_weight=hard, chunk_size=chunk)


def _lm_textbook(x: dict[str, Tensor], h: Tensor, w: Tensor, hard: float) -> Tensor:
    """Both logit tensors materialised, log-softmax, KL (batchmean, T^2), plus the cross-entropy."""
    s = h @ w.T
    with torch.no_grad():
        log_p = F.log_softmax(x["ht"] @ x["wt"].T / T, dim=-1)
    loss = F.kl_div(F.log_softmax(s / T, dim=-1), log_p, reduction="batchmean", log_target=True) * T**2
    return loss + hard * F.cross_entropy(s, x["y"]) if hard else loss


@pytest.mark.parametrize("hard", [0.0, 0.5], ids=["kd", "kd+ce"])
def test_fused_linear_kd_in_one_chunk_dispatches_no_more_than_the_textbook(hard: float) -> None:
    """One chunk (every token at once): no more operators than materialising the logits. With the hard
    term, three more: the CPU label check (one aminmax and its two host reads), which cross_entropy
    does inside its kernel."""
    x = _lm()
    mine, theirs = leaves(x["h"], x["w"]), leaves(x["h"], x["w"])
    torch.testing.assert_close(_fused(x, *mine, N_TOK, hard), _lm_textbook(x, *theirs, hard), rtol=2e-5, atol=2e-6)
    ours = count_ops(lambda: _fused(x, *mine, N_TOK, hard), mine)
    text = count_ops(lambda: _lm_textbook(x, *theirs, hard), theirs)
    label_check = 3 if hard else 0
    assert ours.forward["aminmax"] == (1 if hard else 0)
    assert ours.total <= text.total + label_check, f"{ours.summary()}\n  textbook: {text.summary()}"


@pytest.mark.parametrize("hard", [0.0, 0.5], ids=["kd", "kd+ce"])
def test_fused_linear_kd_pays_at_most_one_textbook_per_further_chunk(hard: float) -> None:
    """Chunking is the design (one matmul pair, log-softmaxes and gradient products per chunk, so that
    the logits never exist in full): the count grows linearly with the chunks, each further chunk costing
    fewer operators than one whole textbook evaluation, plus a constant for the (N,) and (N, H) output
    buffers and the slices that fill them (from the second chunk on)."""
    x = _lm()
    counts = {}
    for chunks in (1, 2, 3, 4):
        h, w = leaves(x["h"], x["w"])
        size = -(-N_TOK // chunks)
        counts[chunks] = count_ops(lambda h=h, w=w, size=size: _fused(x, h, w, size, hard), [h, w]).total
    per_chunk = counts[3] - counts[2]
    assert counts[4] - counts[3] == per_chunk  # linear in the chunk count
    h, w = leaves(x["h"], x["w"])
    text = count_ops(lambda: _lm_textbook(x, h, w, hard), [h, w]).total
    assert per_chunk < text, (counts, text)
    buffers = counts[2] - counts[1] - per_chunk
    # the (N,) and (N, H) output buffers (empty, empty_like), the first chunk's slices of h, h_t and the
    # labels, and the copies of its values and gradient rows into the buffers (slice + copy_, twice)
    assert buffers <= 2 + 3 + 4, counts
    for chunks in (2, 3, 4):
        assert counts[chunks] <= counts[1] + (chunks - 1) * per_chunk + buffers


def _topk_textbook(x: dict[str, Tensor], s: Tensor) -> Tensor:
    """Top-k KD: the teacher's top-k renormalised at T, the student's log-softmax at those classes."""
    log_q = F.log_softmax(s / T, dim=-1).gather(1, x["idx"])
    p = F.softmax(x["lp"] / T, dim=-1)
    return (p * (p.log() - log_q)).sum(-1).mean() * T**2


def test_sparse_kd_dispatches_the_textbook_plus_its_index_checks_and_zero_guard() -> None:
    """sparse_kd without a tail is top-k KD. Beyond the textbook's operators it runs, on CPU tensors, the
    checks of teacher_indices (range: one aminmax, two host reads; distinct per token: sort, two slices,
    eq, any, one host read = 9) and the guard that makes a class of teacher probability 0 contribute 0
    rather than NaN (gt, where and its scalar forward; where and its scalar backward = 5)."""
    x = _lm()
    (mine,), (theirs,) = leaves(x["s"]), leaves(x["s"])
    torch.testing.assert_close(KF.sparse_kd(mine, x["lp"], x["idx"], temperature=T), _topk_textbook(x, theirs))
    ours = count_ops(lambda: KF.sparse_kd(mine, x["lp"], x["idx"], temperature=T), [mine])
    text = count_ops(lambda: _topk_textbook(x, theirs), [theirs])
    assert ours.total <= text.total + 9 + 5, f"{ours.summary()}\n  textbook: {text.summary()}"
