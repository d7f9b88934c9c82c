"""sparse_kd / SparseKDLoss and the TeacherTopK store: values, gradients, bounds, round trips, errors."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

from kdloss import ShapeError, SparseKDLoss, TeacherTopK
from kdloss.functional import soft_kl, sparse_kd
from tests.helpers import Tol, assert_close, assert_compiled_matches_eager
from tests.naive.fused_linear import sparse_kd as naive_sparse_kd
from tests.strategies import PROPERTY_SETTINGS

F64 = Tol(1e-10, 1e-9)


def _teacher(n: int, v: int, k: int, *, seed: int = 0, scale: float = 2.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Teacher logits, their top-k log-probabilities and classes, and the tail mass (float64)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    lp_all = logits.log_softmax(-1)
    lp, idx = lp_all.topk(k, dim=-1)
    tail = lp_all.scatter(1, idx, float("-inf")).logsumexp(-1).exp() if k < v else torch.zeros(n, dtype=torch.float64)
    return logits, lp, idx, tail


def _student(n: int, v: int, *, seed: int = 1) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=g, dtype=torch.float64) * 1.5).requires_grad_(True)


@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd", "tv"])
@pytest.mark.parametrize("with_tail", [True, False])
def test_matches_the_per_token_reference(divergence: str, with_tail: bool) -> None:
    if divergence == "reverse" and not with_tail:
        pytest.skip("reverse KL needs the tail (tested in test_errors)")
    n, v, k = 7, 12, 4
    _, lp, idx, tail = _teacher(n, v, k)
    s = _student(n, v)
    for temperature in (1.0,) if with_tail else (1.0, 3.0):
        kw = {"temperature": temperature, "divergence": divergence, "jsd_weight": 0.3 if divergence == "jsd" else None}
        out = sparse_kd(s, lp, idx, teacher_tail=tail if with_tail else None, **kw)  # type: ignore[arg-type]
        ref = naive_sparse_kd(
            s, lp, idx, tail if with_tail else None, temperature=temperature, divergence=divergence, beta=0.3
        )
        assert_close(out, ref, F64)
        assert_close(torch.autograd.grad(out, s)[0], torch.autograd.grad(ref, s)[0], F64)


def test_the_whole_vocabulary_is_soft_kl() -> None:
    logits, lp, idx, _ = _teacher(5, 9, 9, seed=2)
    s = _student(5, 9, seed=3)
    for t in (1.0, 4.0):
        assert_close(sparse_kd(s, lp, idx, temperature=t), soft_kl(s, logits, temperature=t), F64)
        for d in ("jsd", "tv"):
            assert_close(
                sparse_kd(s, lp, idx, temperature=t, divergence=d),  # type: ignore[arg-type]
                soft_kl(s, logits, temperature=t, direction="jsd") if d == "jsd" else _tv(s, logits, t),
                F64,
            )


def _tv(s: Tensor, t: Tensor, temperature: float) -> Tensor:
    return 0.5 * (F.softmax(s / temperature, -1) - F.softmax(t / temperature, -1)).abs().sum(-1).mean() * temperature**2


def test_without_tail_is_top_k_kd_renormalised() -> None:
    """sum over S of p~ (log p~ - log q), p~ the top-k renormalised at T, q the full student softmax."""
    _, lp, idx, _ = _teacher(6, 10, 3, seed=4)
    s = _student(6, 10, seed=5)
    p = F.softmax(lp / 2.0, dim=-1)
    log_q = F.log_softmax(s / 2.0, dim=-1).gather(1, idx)
    ref = (p * (p.log() - log_q)).sum(-1).mean() * 4.0
    assert_close(sparse_kd(s, lp, idx, temperature=2.0), ref, F64)


@PROPERTY_SETTINGS
@given(k=st.integers(1, 15), seed=st.integers(0, 2**16), scale=st.sampled_from([0.1, 1.0, 5.0]))
def test_property_with_tail_the_forward_kl_is_a_lower_bound(k: int, seed: int, scale: float) -> None:
    """Coarsening both distributions to k + 1 outcomes never increases KL (data processing), and
    the bound grows towards the full KL as k grows."""
    v = 16
    logits, lp, idx, tail = _teacher(4, v, k, seed=seed, scale=scale)
    s = _student(4, v, seed=seed + 1).detach()
    full = soft_kl(s, logits, reduction="none")
    sparse = sparse_kd(s, lp, idx, teacher_tail=tail, reduction="none")
    assert (sparse <= full + 1e-12).all()
    assert (sparse >= -1e-12).all()
    if k < v:
        lp2, idx2 = logits.log_softmax(-1).topk(k + 1, dim=-1)
        tail2 = logits.log_softmax(-1).scatter(1, idx2, float("-inf")).logsumexp(-1).exp() if k + 1 < v else None
        finer = sparse_kd(s, lp2, idx2, teacher_tail=tail2, reduction="none")
        assert (finer >= sparse - 1e-12).all()


def test_labels_mask_and_hard_term() -> None:
    _, lp, idx, tail = _teacher(8, 10, 4, seed=6)
    s = _student(8, 10, seed=7)
    labels = torch.tensor([1, 2, -100, 3, 4, -100, 5, 6])
    rows = sparse_kd(s, lp, idx, teacher_tail=tail, labels=labels, hard_weight=0.5, soft_weight=0.8, reduction="none")
    keep = labels != -100
    assert (rows[~keep] == 0).all()
    soft = sparse_kd(s[keep], lp[keep], idx[keep], teacher_tail=tail[keep], reduction="none")
    ce = F.cross_entropy(s[keep], labels[keep], reduction="none")
    assert_close(rows[keep], 0.8 * soft + 0.5 * ce, F64)
    mean = sparse_kd(s, lp, idx, teacher_tail=tail, labels=labels, hard_weight=0.5, soft_weight=0.8)
    assert_close(mean, rows.sum() / keep.sum(), F64)
    assert_close(sparse_kd(s, lp, idx, teacher_tail=tail, labels=labels, reduction="sum"), soft.sum(), F64)


def test_ignored_tokens_may_hold_nan() -> None:
    _, lp, idx, tail = _teacher(4, 6, 2, seed=8)
    s = _student(4, 6, seed=9).detach().clone()
    s[1] = float("nan")
    lp, tail = lp.clone(), tail.clone()
    lp[1], tail[1] = float("nan"), float("nan")
    s.requires_grad_(True)
    labels = torch.tensor([0, -100, 2, 3])
    out = sparse_kd(s, lp, idx, teacher_tail=tail, labels=labels, hard_weight=1.0)
    (g,) = torch.autograd.grad(out, s)
    assert torch.isfinite(out)
    assert torch.isfinite(g).all()
    assert (g[1] == 0).all()


def test_teacher_gets_no_gradient_and_leading_dims() -> None:
    _, lp, idx, tail = _teacher(6, 8, 3, seed=10)
    lp.requires_grad_(True)
    s = _student(6, 8, seed=11)
    out = sparse_kd(
        s.view(2, 3, 8), lp.view(2, 3, 3), idx.view(2, 3, 3), teacher_tail=tail.view(2, 3), reduction="none"
    )
    assert out.shape == (2, 3)
    assert torch.autograd.grad(out.sum(), lp, allow_unused=True) == (None,)


def test_float32_and_bfloat16_inputs_compute_in_float32() -> None:
    _, lp, idx, tail = _teacher(5, 20, 6, seed=12)
    s = _student(5, 20, seed=13).detach()
    ref = sparse_kd(s, lp, idx, teacher_tail=tail)
    for dtype in (torch.float32, torch.bfloat16):
        out = sparse_kd(s.to(dtype), lp.to(dtype), idx, teacher_tail=tail.to(dtype))
        assert out.dtype == torch.float32
        want = sparse_kd(s.to(dtype).double(), lp.to(dtype).double(), idx, teacher_tail=tail.to(dtype).double())
        assert_close(out, want, Tol(1e-5, 1e-5))
    assert_close(sparse_kd(s.float(), lp.float(), idx, teacher_tail=tail.float()), ref, Tol(1e-5, 1e-5))


def test_compile_fullgraph_matches_eager() -> None:
    _, lp, idx, tail = _teacher(6, 12, 4, seed=14)
    lp32, tail32 = lp.float(), tail.float()

    def fn(s: Tensor, lp_: Tensor, idx_: Tensor, tail_: Tensor) -> Tensor:
        return sparse_kd(s, lp_, idx_, teacher_tail=tail_, divergence="jsd")

    calls = [
        (_student(6, 12, seed=15).float(), lp32, idx, tail32),
        (_student(4, 12, seed=16).float(), lp32[:4], idx[:4], tail32[:4]),
    ]
    assert_compiled_matches_eager(fn, calls, Tol(1e-5, 1e-5), backend="aot_eager")


def test_runs_on_meta_tensors() -> None:
    s = torch.zeros(5, 7, device="meta", requires_grad=True)
    out = sparse_kd(
        s, torch.zeros(5, 3, device="meta"), torch.zeros(5, 3, dtype=torch.long, device="meta"),
        teacher_tail=torch.zeros(5, device="meta"), labels=torch.zeros(5, dtype=torch.long, device="meta"),
        hard_weight=0.5, divergence="reverse",
    )  # fmt: skip
    assert out.device.type == "meta"
    (g,) = torch.autograd.grad(out, s)
    assert g.shape == (5, 7)


def test_module_matches_function() -> None:
    _, lp, idx, tail = _teacher(4, 9, 3, seed=17)
    s = _student(4, 9, seed=18)
    mod = SparseKDLoss(divergence="tv", hard_weight=0.2)
    assert (
        repr(mod)
        == "SparseKDLoss(temperature=1.0, divergence='tv', hard_weight=0.2, soft_weight=1.0, reduction='batchmean')"
    )
    labels = torch.tensor([1, 2, 3, 4])
    got = mod(s, lp, idx, teacher_tail=tail, labels=labels)
    assert torch.equal(got, sparse_kd(s, lp, idx, teacher_tail=tail, labels=labels, divergence="tv", hard_weight=0.2))
    assert repr(pickle.loads(pickle.dumps(mod))) == repr(mod)


def test_errors() -> None:
    _, lp, idx, tail = _teacher(3, 6, 2)
    s = _student(3, 6).detach()
    with pytest.raises(ValueError, match="teacher_tail is the mass outside the top-k at temperature 1"):
        sparse_kd(s, lp, idx, teacher_tail=tail, temperature=2.0)
    with pytest.raises(ValueError, match="divergence='reverse' needs teacher_tail"):
        sparse_kd(s, lp, idx, divergence="reverse")
    with pytest.raises(
        ShapeError,
        match=r"teacher_logprobs and teacher_indices must have the same shape \(\*, k\), got \(3, 2\) and \(3, 3\)",
    ):
        sparse_kd(s, lp, torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(
        ShapeError,
        match=r"teacher_logprobs must have shape \(\*, k\) with \* = student_logits' leading dims \(3,\), got \(2, 2\)",
    ):
        sparse_kd(s, lp[:2], idx[:2])
    with pytest.raises(ShapeError, match=r"the teacher's k must lie in \[1, V\] = \[1, 6\], got k = 7"):
        sparse_kd(s, torch.zeros(3, 7), torch.zeros(3, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="k = V = 6: the top-k is the whole vocabulary and has no tail"):
        sparse_kd(s, *s.log_softmax(-1).topk(6), teacher_tail=torch.zeros(3))
    with pytest.raises(ValueError, match=r"teacher_indices must lie in \[0, 6\) \(V = 6\), got values in \[0, 6\]"):
        sparse_kd(s, lp, torch.tensor([[0, 6], [1, 2], [3, 4]]))
    with pytest.raises(ValueError, match="teacher_indices must hold k distinct classes per token"):
        sparse_kd(s, lp, torch.tensor([[0, 0], [1, 2], [3, 4]]))
    with pytest.raises(TypeError, match="teacher_indices must be an integer tensor"):
        sparse_kd(s, lp, idx.float())
    with pytest.raises(ShapeError, match=r"teacher_tail must have the logits' shape without V, \(3,\), got \(2,\)"):
        sparse_kd(s, lp, idx, teacher_tail=tail[:2])
    with pytest.raises(ValueError, match=r"hard_weight=1.0 > 0 needs labels"):
        sparse_kd(s, lp, idx, hard_weight=1.0)
    with pytest.raises(ValueError, match="reduction must be one of 'none', 'sum', 'batchmean', got 'mean'"):
        SparseKDLoss(reduction="mean")


# ------------------------------------------------------------------------------------ the store


def _write(path: Path, logits: Tensor, k: int, **kw: object) -> TeacherTopK:
    with TeacherTopK.create(path, num_tokens=logits.shape[0], k=k, vocab_size=logits.shape[1], **kw) as w:  # type: ignore[arg-type]
        for part in logits.split(7):
            w.add_logits(part)
    return TeacherTopK(path)


def test_store_round_trip_by_token_range(tmp_path: Path) -> None:
    logits, lp, idx, tail = _teacher(30, 50, 5, seed=19)
    store = _write(tmp_path / "s", logits.float(), 5, metadata={"corpus": "x", "sha": 1})
    assert (len(store), store.k, store.vocab_size, store.has_tail) == (30, 5, 50, True)
    assert store.metadata == {"corpus": "x", "sha": 1}
    got_lp, got_idx, got_tail = store.read(4, 17)
    assert got_lp.dtype == torch.float32
    assert got_idx.dtype == torch.int64
    assert torch.equal(got_idx, idx[4:17])
    assert_close(got_lp, lp[4:17], Tol(1e-6, 1e-6))
    assert got_tail is not None
    assert_close(got_tail, tail[4:17], Tol(1e-6, 1e-5))
    a, b, c = store[4:17]
    assert torch.equal(a, got_lp)
    assert torch.equal(b, got_idx)
    assert c is not None
    assert torch.equal(c, got_tail)
    assert store.read(30, 30)[0].shape == (0, 5)
    # what sparse_kd gets from the store is what it gets from the teacher directly
    s = _student(13, 50, seed=20).float()
    assert_close(
        sparse_kd(s, got_lp, got_idx, teacher_tail=got_tail),
        sparse_kd(s, lp[4:17].float(), idx[4:17], teacher_tail=tail[4:17].float()),
        Tol(1e-6, 1e-5),
    )
    assert "num_tokens=30, k=5" in repr(store)


def test_store_reads_are_memory_mapped_copies(tmp_path: Path) -> None:
    logits = _teacher(10, 8, 2, seed=21)[0].float()
    store = _write(tmp_path / "s", logits, 2)
    lp, _, _ = store.read(0, 10)
    lp.fill_(0.0)  # the caller's copy: the file and later reads are unchanged
    assert not torch.equal(store.read(0, 10)[0], lp)


def test_store_half_precision_values_and_no_tail(tmp_path: Path) -> None:
    logits, lp, idx, _ = _teacher(9, 20, 4, seed=22)
    store = _write(tmp_path / "h", logits.float(), 4, values_dtype=torch.float16, with_tail=False)
    got_lp, got_idx, tail = store.read(0, 9)
    assert tail is None
    assert torch.equal(got_idx, idx)
    assert_close(got_lp, lp, Tol(1e-2, 1e-3))
    assert (tmp_path / "h" / "logprobs.bin").stat().st_size == 9 * 4 * 2


def _crash_while_writing(path: Path) -> None:
    with TeacherTopK.create(path, num_tokens=10, k=2, vocab_size=5) as w:
        w.add_logits(torch.randn(4, 5))
        raise RuntimeError("teacher crashed")


def _stop_early(path: Path) -> None:
    with TeacherTopK.create(path, num_tokens=10, k=2, vocab_size=5) as w:
        w.add_logits(torch.randn(4, 5))


def test_store_writes_are_atomic(tmp_path: Path) -> None:
    path = tmp_path / "store"
    with pytest.raises(RuntimeError, match="teacher crashed"):
        _crash_while_writing(path)
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary directory left either
    with pytest.raises(ValueError, match="4 of the 10 tokens were written"):
        _stop_early(path)
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_store_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "store"
    _write(path, torch.randn(6, 5), 2)
    with pytest.raises(FileExistsError, match="exists: pass overwrite=True"):
        TeacherTopK.create(path, num_tokens=6, k=2, vocab_size=5)
    new = _teacher(8, 5, 3, seed=23)[0].float()
    store = _write(path, new, 3, overwrite=True)
    assert (len(store), store.k) == (8, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_store_verify_finds_changed_bytes(tmp_path: Path) -> None:
    store = _write(tmp_path / "s", torch.randn(6, 5), 2)
    store.verify()  # as written
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    assert sorted(meta["sha256"]) == ["indices.bin", "logprobs.bin", "tail.bin"]
    with open(tmp_path / "s" / "logprobs.bin", "r+b") as f:  # four bytes flipped in place: sizes still right
        f.seek(8)
        data = f.read(4)
        f.seek(8)
        f.write(bytes(b ^ 0xFF for b in data))
    reopened = TeacherTopK(tmp_path / "s")  # opening checks sizes only
    with pytest.raises(ValueError, match=r"logprobs.bin' does not match its checksum .*the store is corrupt"):
        reopened.verify()
    del meta["sha256"]
    (tmp_path / "s" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"has no checksum for logprobs\.bin: it cannot be verified"):
        TeacherTopK(tmp_path / "s").verify()


def test_store_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no teacher store at"):
        TeacherTopK(tmp_path / "missing")
    store = _write(tmp_path / "s", torch.randn(6, 5), 2)
    with pytest.raises(IndexError, match=r"token range \[4, 9\) is outside the store's \[0, 6\)"):
        store.read(4, 9)
    with pytest.raises(TypeError, match="start must be an int, got float"):
        store.read(1.0, 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="a token range has step 1, got 2"):
        store[0:6:2]
    with open(tmp_path / "s" / "indices.bin", "r+b") as f:
        f.truncate(8)
    with pytest.raises(ValueError, match=r"indices.bin' has 8 bytes, expected 48 \(12 x int32\)"):
        TeacherTopK(tmp_path / "s")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "meta.json").write_text(json.dumps({"format": "other/1"}))
    with pytest.raises(ValueError, match=r"is not a teacher store of format 'kdloss.teacher_topk/1'"):
        TeacherTopK(bad)
    with TeacherTopK.create(tmp_path / "w", num_tokens=3, k=2, vocab_size=5) as w:
        with pytest.raises(ShapeError, match=r"logits must have shape \(\*, V\) with V = vocab_size = 5, got \(3, 4\)"):
            w.add_logits(torch.randn(3, 4))
        with pytest.raises(ValueError, match="this store holds the tail mass"):
            w.add_topk(torch.zeros(3, 2), torch.zeros(3, 2, dtype=torch.long))
        with pytest.raises(ValueError, match=r"indices must lie in \[0, 5\), got values in \[0, 7\]"):
            w.add_topk(torch.zeros(3, 2), torch.tensor([[0, 1], [7, 2], [3, 4]]), torch.zeros(3))
        with pytest.raises(ValueError, match="the store was created for 3 tokens; 0 are written and 4 more do not fit"):
            w.add_logits(torch.randn(4, 5))
        w.add_logits(torch.randn(3, 5))
    with pytest.raises(ValueError, match="k must be <= vocab_size, got k=6 and vocab_size=5"):
        TeacherTopK.create(tmp_path / "x", num_tokens=3, k=6, vocab_size=5)
    with pytest.raises(TypeError, match="values_dtype must be one of float32, float16, bfloat16"):
        TeacherTopK.create(tmp_path / "x", num_tokens=3, k=2, vocab_size=5, values_dtype=torch.float64)
    with pytest.raises(TypeError, match="metadata must be JSON-serialisable"):
        TeacherTopK.create(tmp_path / "x", num_tokens=3, k=2, vocab_size=5, metadata={"t": torch.zeros(1)})
    assert not (tmp_path / "x").exists()
    assert sorted(os.listdir(tmp_path)) == ["bad", "s", "w"]


@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
def test_a_nan_teacher_probability_gives_nan_not_zero(divergence: str) -> None:
    """A class of teacher probability 0 contributes 0; a NaN (a corrupt teacher store) is not read as 0."""
    _, lp, idx, tail = _teacher(3, 10, 4, seed=7)
    s = _student(3, 10, seed=8).detach()
    lp = lp.clone()
    lp[1, 2] = float("nan")
    got = sparse_kd(s, lp, idx, teacher_tail=tail, divergence=divergence, reduction="none")  # type: ignore[arg-type]
    assert torch.isnan(got[1])
    assert torch.isfinite(got[[0, 2]]).all()
    lp[1, 2] = float("-inf")  # a class the teacher rules out: finite (the reverse KL, infinite there, aside)
    again = sparse_kd(s, lp, idx, teacher_tail=tail, divergence=divergence, reduction="none")  # type: ignore[arg-type]
    assert torch.isfinite(again).all() if divergence != "reverse" else again[1] == float("inf")
