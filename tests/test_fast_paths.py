"""The cheaper formulations chosen by shape agree with the textbook ones on both sides of each choice."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

import kdloss.functional as KF
from kdloss.functional import contrastive as C
from tests.naive import relational as nm

F64 = torch.float64


def _r(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.mark.parametrize(
    ("cs", "ct", "hw", "spatial"),
    [(16, 12, (2, 2), True), (2, 3, (4, 4), False), (5, 5, (3, 2), True)],
    ids=["spatial-gram", "channel-gram", "equal-channels"],
)
def test_nst_both_forms_equal_the_loop_reference(cs: int, ct: int, hw: tuple[int, int], spatial: bool) -> None:
    """Degree 2, bias 0: ||A^T A / C_s - B^T B / C_t||_F^2 where the spatial Grams are smaller, the three
    channel-Gram kernel means elsewhere; both are the MMD of the paper."""
    s, t = _r(3, cs, *hw, seed=1), _r(3, ct, *hw, seed=2)
    uses_spatial = hw[0] * hw[1] * (cs + ct) < cs * cs + ct * ct + cs * ct
    assert uses_spatial == spatial
    torch.testing.assert_close(KF.nst_loss(s, t), nm.nst(s, t, 2, 0.0), rtol=1e-10, atol=1e-12)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: KF.nst_loss(a, t), (s,))


def test_nst_other_kernels_still_match() -> None:
    s, t = _r(2, 3, 2, 2, seed=3), _r(2, 4, 2, 2, seed=4)
    torch.testing.assert_close(KF.nst_loss(s, t, degree=3, bias=0.5), nm.nst(s, t, 3, 0.5), rtol=1e-10, atol=1e-12)


def test_fsp_with_stages_of_different_sizes_on_the_two_networks() -> None:
    """The 1/hw of each flow matrix is applied per side when the student's and teacher's stages differ in size."""
    s = [_r(2, 3, 4, 4, seed=5), _r(2, 2, 2, 2, seed=6)]
    t = [_r(2, 3, 8, 8, seed=7), _r(2, 2, 4, 4, seed=8)]
    want = ((KF.fsp_matrix(t[0], t[1]) - KF.fsp_matrix(s[0], s[1])) ** 2).sum(dim=(1, 2)).mean()
    torch.testing.assert_close(KF.fsp_loss(s, t), want, rtol=1e-12, atol=1e-12)
    rows = KF.fsp_loss(s, t, reduction="none", variant="repdistiller")
    want_rows = ((KF.fsp_matrix(t[0], t[1]) - KF.fsp_matrix(s[0], s[1])) ** 2).mean(dim=(1, 2))
    torch.testing.assert_close(rows, want_rows, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("size", [(8, 8), (6, 6), (12, 10)], ids=["nested", "not-divisible", "non-square"])
def test_hcl_pooled_pyramid_equals_pooling_the_full_map(size: tuple[int, int]) -> None:
    """Each level is pooled from the previous one only where the bins nest; the value is the authors'."""
    s, t = _r(2, 3, *size, seed=9), _r(2, 3, *size, seed=10)

    def authors(fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
        loss, cnt, tot = F.mse_loss(fs, ft), 1.0, 1.0
        for level in (4, 2, 1):
            if level >= fs.shape[2]:
                continue
            cnt /= 2.0
            loss = loss + F.mse_loss(F.adaptive_avg_pool2d(fs, level), F.adaptive_avg_pool2d(ft, level)) * cnt
            tot += cnt
        return loss / tot

    torch.testing.assert_close(KF.hcl_loss(s, t), authors(s, t), rtol=1e-12, atol=1e-12)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: KF.hcl_loss(a, t), (s,))


@pytest.mark.parametrize("pairwise_max", [1024, 0], ids=["pairwise", "sort"])
def test_last_occurrence_both_ways(monkeypatch: pytest.MonkeyPatch, pairwise_max: int) -> None:
    """The (B, B) table (small batches) and the sort (large ones) pick the same positions."""
    monkeypatch.setattr(C, "_PAIRWISE_MAX", pairwise_max)
    g = torch.Generator().manual_seed(11)
    for b in (1, 5, 40):
        idx = torch.randint(0, 7, (b,), generator=g)
        finite = torch.rand(b, generator=g) > 0.3
        got = C._last_occurrence(idx, finite)
        for i in range(b):
            same = [j for j in range(b) if idx[j] == idx[i]]
            good = [j for j in same if finite[j]]
            assert int(got[i]) == max(good or same)
        plain = C._last_occurrence(idx)
        assert plain.tolist() == [max(j for j in range(b) if idx[j] == idx[i]) for i in range(b)]


def test_rkd_gram_form_is_exact_far_from_the_origin() -> None:
    """Distances and angles come from the Gram matrix of the centred embeddings: an offset of 1e3 (float32)
    changes nothing beyond rounding."""
    e = torch.randn(6, 5, generator=torch.Generator().manual_seed(12))
    t = torch.randn(6, 3, generator=torch.Generator().manual_seed(13))
    near = KF.rkd_loss(e, t)
    far = KF.rkd_loss(e + 1e3, t - 1e3)
    torch.testing.assert_close(far, near, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(KF.rkd_loss(e.double(), t.double()), nm.rkd(e.double(), t.double(), 25.0, 50.0, "all"))


def test_hint_of_an_empty_batch_is_zero() -> None:
    s = torch.zeros(0, 4, 2, 2, requires_grad=True)
    for reduction in ("mean", "sum", "batchmean"):
        out = KF.hint_loss(s, torch.zeros(0, 4, 2, 2), reduction=reduction)  # type: ignore[arg-type]
        assert out.item() == 0.0
        (g,) = torch.autograd.grad(out, s)
        assert g.shape == s.shape
    assert KF.hint_loss(s, torch.zeros(0, 4, 2, 2), reduction="none").shape == (0,)


def test_pkt_masked_and_plain_forms_agree() -> None:
    """eps > 0 with self-pairs takes the form without masks; eps = 0 the guarded one; both equal the paper's."""
    s, t = _r(5, 4, seed=14), _r(5, 6, seed=15)
    plain = KF.pkt_loss(s, t, reduction="sum", eps=1e-300)
    guarded = KF.pkt_loss(s, t, reduction="sum", eps=0.0)
    torch.testing.assert_close(plain, guarded, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(plain, nm.pkt(s, t, include_self=True), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("inf", [False, True], ids=["finite", "minus-inf"])
@pytest.mark.parametrize(
    "call",
    [
        lambda s, t, y: KF.soft_kl(s, t, temperature=2.0),
        lambda s, t, y: KF.soft_kl(s, t, temperature=2.0, direction="reverse", reduction="none"),
        lambda s, t, y: KF.soft_kl(s, t, temperature=2.0, direction="jsd", jsd_weight=0.3),
        lambda s, t, y: KF.kd_ce_loss(s, t, y, alpha=0.7, temperature=3.0),
        lambda s, t, y: KF.kd_ce_loss(s.float(), t.float(), y, alpha=0.7, temperature=3.0, ignore_index=1),
    ],
    ids=["kd", "reverse-none", "jsd", "kd-ce", "kd-ce-ignored"],
)
def test_a_forward_without_graph_equals_the_functions_value(
    call: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], inf: bool
) -> None:
    """Without a graph to build the KL family skips its autograd.Function: the same value either way."""
    s, t, y = _r(6, 5), _r(6, 5, seed=1), torch.tensor([0, 1, 2, 3, 4, 1])
    if inf:
        s[1, 2] = t[2, 0] = float("-inf")
    with torch.no_grad():
        plain = call(s, t, y)
    graph = call(s.clone().requires_grad_(), t, y)
    assert graph.grad_fn is not None
    assert plain.grad_fn is None
    torch.testing.assert_close(plain, graph.detach(), equal_nan=True)
