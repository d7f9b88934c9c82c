"""CRD: parity with the textbook reference, state, sampling, bad input, no host sync."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdloss import ContrastMemory, CRDLoss, ShapeError
from kdloss.functional import (
    crd_embed,
    crd_logits,
    crd_memory_update,
    crd_nce_loss,
    crd_normalizer,
)
from tests.naive.contrastive import NaiveCRD, naive_exp_scores, naive_nce, naive_update

N, S_DIM, T_DIM, D, K, B = 64, 12, 10, 8, 16, 6


def _pair(method: str = "auto", seed: int = 0, **kw: object) -> tuple[CRDLoss, NaiveCRD]:
    torch.manual_seed(seed)
    naive = NaiveCRD(S_DIM, T_DIM, N, D, K)
    crd = CRDLoss(S_DIM, T_DIM, N, feat_dim=D, n_negatives=K, method=method, **kw)  # type: ignore[arg-type]
    with torch.no_grad():
        crd.embed_student.linear.load_state_dict(naive.embed_s.linear.state_dict())
        crd.embed_teacher.linear.load_state_dict(naive.embed_t.linear.state_dict())
        crd.memory.bank_student.copy_(naive.memory_v1)
        crd.memory.bank_teacher.copy_(naive.memory_v2)
    return crd, naive


def _batch(seed: int, dup: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    fs = torch.randn(B, 3, 4, generator=g)
    ft = torch.randn(B, T_DIM, generator=g)
    idx = torch.randperm(N, generator=g)[:B]
    if dup:
        idx[2] = idx[0]
        idx[4] = idx[0]
    neg = torch.randint(0, N, (B, K), generator=g)
    return fs, ft, idx, neg


@pytest.mark.parametrize("method", ["matmul", "gather"])
def test_parity_with_textbook_reference_over_steps(method: str) -> None:
    crd, naive = _pair(method, chunk_size=5)
    for step in range(3):
        fs, ft, idx, neg = _batch(step, dup=step == 1)
        fs1 = fs.clone().requires_grad_()
        fs2 = fs.clone().requires_grad_()
        loss = crd(fs1, ft, idx, negatives=neg)
        ref = naive(fs2.view(B, -1), ft, idx, neg)
        torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
        crd.zero_grad()
        naive.zero_grad()
        loss.backward()
        ref.backward()
        torch.testing.assert_close(fs1.grad, fs2.grad, atol=1e-5, rtol=1e-5)
        for a, b in [
            (crd.embed_student.linear, naive.embed_s.linear),
            (crd.embed_teacher.linear, naive.embed_t.linear),
        ]:
            torch.testing.assert_close(a.weight.grad, b.weight.grad, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(a.bias.grad, b.bias.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(crd.memory.normalizers, torch.tensor([naive.z_v1, naive.z_v2]), atol=0, rtol=1e-5)
        torch.testing.assert_close(crd.memory.bank_student, naive.memory_v1, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(crd.memory.bank_teacher, naive.memory_v2, atol=1e-6, rtol=1e-5)
    assert crd.memory.normalizers[0] == pytest.approx(naive.z_v1, rel=1e-5)  # Z fixed after step 1


def test_functional_parts_match_reference() -> None:
    g = torch.Generator().manual_seed(1)
    bank = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=1)
    v = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=1)
    idx = torch.randint(0, N, (B, K + 1), generator=g)
    logits = crd_logits(v, bank, idx, temperature=0.1)
    x = naive_exp_scores(v, bank, idx, 0.1)
    torch.testing.assert_close(logits.exp(), x, rtol=1e-5, atol=0)
    z = crd_normalizer(logits, N)
    torch.testing.assert_close(z, x.mean() * N, rtol=1e-5, atol=0)
    torch.testing.assert_close(crd_nce_loss(logits, z, N), naive_nce(x / z, N), rtol=1e-5, atol=1e-5)
    per_row = crd_nce_loss(logits, float(z), N, reduction="none")
    assert per_row.shape == (B,)
    torch.testing.assert_close(crd_nce_loss(logits, z, N, reduction="sum"), per_row.sum())
    # the update, duplicates included: last occurrence wins, like the sequential reference
    uidx = torch.tensor([3, 5, 3, 7, 3, 5])
    emb = torch.randn(6, D, generator=g)
    ref = bank.clone()
    naive_update(ref, uidx, emb, 0.5)
    out = crd_memory_update(bank, uidx, emb, 0.5)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    assert torch.equal(out[0], bank[0])  # untouched rows stay


def test_embed_matches_reference_head() -> None:
    lin = torch.nn.Linear(12, 4)
    x = torch.randn(3, 3, 4)
    ref = lin(x.view(3, -1))
    ref = ref / ref.pow(2).sum(1, keepdim=True).pow(0.5)
    torch.testing.assert_close(crd_embed(x, lin.weight, lin.bias), ref)


def test_gather_path_equals_matmul_path_with_grads() -> None:
    g = torch.Generator().manual_seed(2)
    bank = torch.randn(N, D, generator=g)
    idx = torch.randint(0, N, (B, K + 1), generator=g)
    idx[:, 3] = idx[:, 4]  # a repeated column accumulates its gradient
    v1 = torch.randn(B, D, generator=g, requires_grad=True)
    v2 = v1.detach().clone().requires_grad_()
    a = crd_logits(v1, bank, idx, method="matmul")
    b = crd_logits(v2, bank, idx, method="gather", chunk_size=4)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    w = torch.randn(B, K + 1, generator=g)
    (a * w).sum().backward()
    (b * w).sum().backward()
    torch.testing.assert_close(v1.grad, v2.grad, rtol=1e-5, atol=1e-5)


def test_scores_are_float32_for_half_inputs_and_under_autocast() -> None:
    bank = torch.nn.functional.normalize(torch.randn(N, D), dim=1).to(torch.bfloat16)
    v = torch.nn.functional.normalize(torch.randn(B, D), dim=1).half()
    idx = torch.randint(0, N, (B, K + 1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = crd_logits(v, bank, idx, temperature=0.01)
    assert out.dtype == torch.float32
    assert torch.isfinite(out.exp()).all()  # exp(<v, w> / 0.01) would overflow float16
    torch.testing.assert_close(out, crd_logits(v.float(), bank.float(), idx, temperature=0.01))


def test_bfloat16_bank_trains_close_to_float32() -> None:
    crd32, _ = _pair("matmul")
    crd16, _ = _pair("matmul", bank_dtype=torch.bfloat16)
    with torch.no_grad():
        crd16.memory.bank_student.copy_(crd32.memory.bank_student)
        crd16.memory.bank_teacher.copy_(crd32.memory.bank_teacher)
    fs, ft, idx, neg = _batch(0)
    assert crd16.memory.bank_student.dtype == torch.bfloat16
    torch.testing.assert_close(crd16(fs, ft, idx, negatives=neg), crd32(fs, ft, idx, negatives=neg), rtol=2e-2, atol=0)
    assert crd16.memory.bank_student.dtype == torch.bfloat16


def test_uniform_sampling_covers_range() -> None:
    mem = ContrastMemory(50, 4, n_negatives=400)
    neg = mem.sample_negatives(torch.arange(8), generator=torch.Generator().manual_seed(0))
    assert neg.shape == (8, 400)
    assert neg.dtype == torch.long
    assert int(neg.min()) == 0
    assert int(neg.max()) == 49
    assert torch.unique(neg).numel() == 50
    counts = torch.bincount(neg.flatten(), minlength=50).float()
    assert counts.std() / counts.mean() < 0.2  # 64 expected per value


@pytest.mark.parametrize("replacement", [True, False])
def test_class_sampling_never_draws_the_anchor_class(replacement: bool) -> None:
    labels = torch.arange(60) % 3  # 20 per class, 40 others
    mem = ContrastMemory(60, 4, n_negatives=30, negatives="class", labels=labels, replacement=replacement)
    idx = torch.arange(60)
    neg = mem.sample_negatives(idx, generator=torch.Generator().manual_seed(0))
    assert neg.shape == (60, 30)
    assert not (labels[neg] == labels[idx].unsqueeze(1)).any()
    if not replacement:  # 40 >= 30 others: distinct per row
        assert all(torch.unique(row).numel() == 30 for row in neg)
    # every other-class sample is reachable
    cls0 = neg[labels[idx] == 0].flatten()
    assert set(cls0.tolist()) == set(torch.nonzero(labels != 0).flatten().tolist())


def test_class_sampling_with_too_few_others_uses_replacement() -> None:
    labels = torch.tensor([0] * 40 + [1] * 5 + [2] * 5)  # class 0 has 10 others < K=20, classes 1/2 have 45
    mem = ContrastMemory(50, 4, n_negatives=20, negatives="class", labels=labels)
    idx = torch.tensor([0, 1, 40, 45])
    neg = mem.sample_negatives(idx, generator=torch.Generator().manual_seed(3))
    assert not (labels[neg] == labels[idx].unsqueeze(1)).any()
    assert torch.unique(neg[0]).numel() <= 10  # with replacement: only 10 candidates
    assert torch.unique(neg[2]).numel() == 20  # enough others: distinct


def test_state_dict_round_trip_reproduces_z_and_banks() -> None:
    crd, _ = _pair("matmul")
    for s in range(2):
        fs, ft, idx, neg = _batch(s)
        crd(fs, ft, idx, negatives=neg).backward()
    buf = io.BytesIO()
    torch.save(crd.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf)
    assert {"memory.bank_student", "memory.bank_teacher", "memory.normalizers"} <= set(state)
    fresh = CRDLoss(S_DIM, T_DIM, N, feat_dim=D, n_negatives=K)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.memory.normalizers, crd.memory.normalizers)
    assert torch.equal(fresh.memory.bank_student, crd.memory.bank_student)
    fs, ft, idx, neg = _batch(7)
    assert torch.equal(fresh(fs, ft, idx, negatives=neg), crd(fs, ft, idx, negatives=neg))
    assert torch.equal(fresh.memory.normalizers, crd.memory.normalizers)  # the loaded Z is kept
    assert torch.equal(fresh.memory.bank_teacher, crd.memory.bank_teacher)


def test_loading_an_unset_z_sets_it_again_on_the_next_step() -> None:
    crd, _ = _pair()
    blank = {k: v.clone() for k, v in crd.state_dict().items()}
    fs, ft, idx, neg = _batch(0)
    crd(fs, ft, idx, negatives=neg)
    z_first = crd.memory.normalizers.clone()
    crd.load_state_dict(blank)
    assert (crd.memory.normalizers == -1).all()
    crd(fs, ft, idx, negatives=neg)
    assert torch.equal(crd.memory.normalizers, z_first)


def test_class_labels_are_state_and_tables_rebuilt_on_load() -> None:
    labels = torch.arange(N) % 4
    crd = CRDLoss(S_DIM, T_DIM, N, feat_dim=D, n_negatives=K, negatives="class", labels=labels)
    other = CRDLoss(S_DIM, T_DIM, N, feat_dim=D, n_negatives=K, negatives="class", labels=labels.flip(0))
    other.load_state_dict(crd.state_dict())
    assert torch.equal(other.memory.labels, labels)
    neg = other.memory.sample_negatives(torch.arange(8))
    assert not (labels[neg] == labels[:8].unsqueeze(1)).any()


def test_eval_mode_does_not_touch_state() -> None:
    crd, _ = _pair()
    crd.eval()
    before = {k: v.clone() for k, v in crd.state_dict().items()}
    fs, ft, idx, neg = _batch(0)
    loss = crd(fs, ft, idx, negatives=neg)
    assert torch.isfinite(loss)
    assert all(torch.equal(v, crd.state_dict()[k]) for k, v in before.items())


def _assert_bad_step_leaves_state(crd: CRDLoss, exc: type[Exception], match: str, *args: object, **kw: object) -> None:
    before = {k: v.clone() for k, v in crd.memory.state_dict().items()}
    with pytest.raises(exc, match=match):
        crd(*args, **kw)
    after = crd.memory.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def test_bad_inputs_raise_clear_errors_and_leave_banks_unchanged() -> None:
    crd, _ = _pair()
    fs, ft, idx, neg = _batch(0)
    crd(fs, ft, idx, negatives=neg)  # Z set: later failures must not move it either
    bad = idx.clone()
    bad[1] = N
    _assert_bad_step_leaves_state(crd, ValueError, r"indices must lie in \[0, n_data=64\), got values in", fs, ft, bad)
    bad[1] = -1
    _assert_bad_step_leaves_state(crd, ValueError, r"indices must lie in \[0, n_data=64\)", fs, ft, bad, negatives=neg)
    badneg = neg.clone()
    badneg[0, 0] = 10**6
    _assert_bad_step_leaves_state(
        crd, ValueError, r"negatives must lie in \[0, n_data=64\)", fs, ft, idx, negatives=badneg
    )
    _assert_bad_step_leaves_state(
        crd, ShapeError, r"negatives must have shape \(B, n_negatives\) = \(6, 16\)", fs, ft, idx, negatives=neg[:, :3]
    )
    _assert_bad_step_leaves_state(
        crd, ShapeError, r"student_features must be \(B, \.\.\.\) with 12 features", fs[:, :2], ft, idx
    )
    _assert_bad_step_leaves_state(
        crd, ShapeError, r"teacher_features must be \(B, \.\.\.\) with 10", fs, ft[:, :3], idx
    )
    _assert_bad_step_leaves_state(crd, TypeError, r"indices must be an integer tensor", fs, ft, idx.float())
    _assert_bad_step_leaves_state(crd, ShapeError, r"same batch size", fs, ft, idx[:4])


def test_memory_rejects_bad_embeddings() -> None:
    mem = ContrastMemory(N, D, n_negatives=K)
    v = torch.randn(B, D)
    with pytest.raises(ShapeError, match=r"student_embedding must have feat_dim=8 columns, got shape \(6, 5\)"):
        mem(v[:, :5], v, torch.arange(B))
    with pytest.raises(TypeError, match="teacher_embedding must be a floating-point tensor"):
        mem(v, torch.ones(B, D, dtype=torch.long), torch.arange(B))


def test_bad_configuration_raises() -> None:
    with pytest.raises(ValueError, match=r"negatives='class' .* needs the dataset's labels"):
        ContrastMemory(N, D, negatives="class")
    with pytest.raises(
        ShapeError, match=r"labels must have one entry per dataset sample, shape \(n_data,\) = \(64,\), got \(50,\)"
    ):
        CRDLoss(S_DIM, T_DIM, N, negatives="class", labels=torch.zeros(50, dtype=torch.long))
    with pytest.raises(ValueError, match="at least two classes"):
        ContrastMemory(N, D, negatives="class", labels=torch.zeros(N, dtype=torch.long))
    with pytest.raises(ValueError, match=r"dtype must be torch\.float32 or torch\.bfloat16"):
        ContrastMemory(N, D, dtype=torch.float16)
    with pytest.raises(ValueError, match="method must be one of"):
        ContrastMemory(N, D, method="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_negatives must be a positive int, got 0"):
        ContrastMemory(N, D, n_negatives=0)
    with pytest.raises(ValueError, match=r"momentum must lie in \[0, 1\], got 1.5"):
        ContrastMemory(N, D, momentum=1.5)
    with pytest.raises(ValueError, match="labels must be non-negative class ids, got minimum -1"):
        ContrastMemory(N, D, negatives="class", labels=torch.arange(N) - 1)
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        ContrastMemory(N, D, negatives="class", labels=torch.zeros(N))
    with pytest.raises(ValueError, match="chunk_size must be a positive int or None, got 0"):
        ContrastMemory(N, D, chunk_size=0)


def test_checkpoint_of_another_dataset_size_is_rejected() -> None:
    crd = CRDLoss(S_DIM, T_DIM, N, feat_dim=D, n_negatives=K)
    other = CRDLoss(S_DIM, T_DIM, N + 1, feat_dim=D, n_negatives=K)
    with pytest.raises(ShapeError, match=r"memory.bank_student in the checkpoint has shape \(64, 8\).*\(65, 8\)"):
        other.load_state_dict(crd.state_dict())


def test_functional_bad_inputs() -> None:
    bank = torch.randn(N, D)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, n_data=64\), got values in \[0, 64\]"):
        crd_logits(torch.randn(2, D), bank, torch.tensor([[0, 64], [1, 2]]))
    with pytest.raises(ShapeError, match="anchor must have the bank's feature width 8"):
        crd_logits(torch.randn(2, 3), bank, torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ShapeError, match="at least one negative"):
        crd_nce_loss(torch.zeros(2, 1), 1.0, N)
    with pytest.raises(ValueError, match="normalizer must be a finite number > 0"):
        crd_nce_loss(torch.zeros(2, 3), -1.0, N)
    with pytest.raises(ValueError, match="momentum must lie in"):
        crd_memory_update(bank, torch.tensor([0]), torch.randn(1, D), momentum=2.0)
    with pytest.raises(ShapeError, match=r"embeddings must have shape \(B, feat_dim\) = \(1, 8\), got \(1, 3\)"):
        crd_memory_update(bank, torch.tensor([0]), torch.randn(1, 3))
    with pytest.raises(ShapeError, match="features flattened to width 6"):
        crd_embed(torch.randn(2, 6), torch.randn(4, 5))


@contextlib.contextmanager
def _forbid_host_reads() -> Iterator[None]:
    """Make every Python-level read of a tensor's value raise (item, bool, int, float, tolist, numpy)."""

    def boom(*_: object, **__: object) -> None:
        raise AssertionError("host synchronisation in the step")

    names = ["item", "__bool__", "__int__", "__float__", "__index__", "tolist", "numpy"]
    saved = {n: getattr(torch.Tensor, n) for n in names}
    try:
        for n in names:
            setattr(torch.Tensor, n, boom)
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


@pytest.mark.parametrize("negatives", ["uniform", "class"])
def test_validate_false_step_reads_no_tensor_value(negatives: str) -> None:
    labels = torch.arange(N) % 4
    crd = CRDLoss(S_DIM, T_DIM, N, feat_dim=D, n_negatives=K, negatives=negatives, labels=labels, validate=False)  # type: ignore[arg-type]
    fs, ft, idx, _ = _batch(0, dup=True)
    with _forbid_host_reads():
        for _ in range(2):  # first step sets Z, second uses it
            loss = crd(fs.requires_grad_(), ft, idx)
            loss.backward()
    assert torch.isfinite(loss.detach()).all()
    crd.memory.validate = True  # the check itself is what reads values
    with _forbid_host_reads(), pytest.raises(AssertionError, match="host synchronisation"):
        crd(fs, ft, idx)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("negatives", ["uniform", "class"])
def test_cuda_step_has_no_sync_under_sync_debug_mode(negatives: str) -> None:
    labels = torch.arange(N) % 4
    crd = CRDLoss(
        S_DIM,
        T_DIM,
        N,
        feat_dim=D,
        n_negatives=K,
        negatives=negatives,
        labels=labels,
        validate=False,  # type: ignore[arg-type]
    ).cuda()
    fs, ft, idx, _ = (t.cuda() for t in _batch(0))
    crd(fs, ft, idx).backward()  # warm-up (first-call allocations)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            crd(fs.requires_grad_(), ft, idx).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    crd, _ = _pair("matmul")
    crd_gpu, _ = _pair("matmul")
    crd_gpu.cuda()
    fs, ft, idx, neg = _batch(0)
    out = crd_gpu(fs.cuda(), ft.cuda(), idx.cuda(), negatives=neg.cuda())
    torch.testing.assert_close(out.cpu(), crd(fs, ft, idx, negatives=neg), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(crd_gpu.memory.bank_student.cpu(), crd.memory.bank_student, rtol=1e-5, atol=1e-5)


def test_functional_scoring_and_nce_compile() -> None:
    def f(v: torch.Tensor, bank: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        logits = crd_logits(v, bank, idx, method="matmul", validate=False)
        return crd_nce_loss(logits, crd_normalizer(logits, N), N)

    g = torch.Generator().manual_seed(4)
    v, bank = torch.randn(4, D, generator=g), torch.randn(N, D, generator=g)
    idx = torch.randint(0, N, (4, 5), generator=g)
    compiled = torch.compile(f, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(v, bank, idx), f(v, bank, idx))


def test_repr() -> None:
    r = repr(CRDLoss(S_DIM, T_DIM, N, feat_dim=D, n_negatives=K))
    assert "embed_student" in r
    assert "ContrastMemory(n_data=64, feat_dim=8, n_negatives=16, temperature=0.07, momentum=0.5" in r


def test_user_loop_as_in_the_docs() -> None:
    """docs/crd.md's loop with tiny models: a Dataset wrapper supplies the indices, the banks follow."""
    from torch.utils.data import DataLoader, Dataset, TensorDataset

    from kdloss import FeatureTap, KDLoss

    class WithIndex(Dataset[tuple[torch.Tensor, torch.Tensor, int]]):
        def __init__(self, base: TensorDataset) -> None:
            self.base = base

        def __len__(self) -> int:
            return len(self.base)

        def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
            x, y = self.base[i]
            return x, y, i

    torch.manual_seed(0)
    base = TensorDataset(torch.randn(32, 6), torch.arange(32) % 3)
    train_set = WithIndex(base)
    loader = DataLoader(train_set, batch_size=8, shuffle=True, drop_last=True)

    def net() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))

    student, teacher = net(), net()
    crd = CRDLoss(5, 5, n_data=len(train_set), feat_dim=4, n_negatives=8, negatives="class", labels=base.tensors[1])
    kd = KDLoss(temperature=4.0)
    opt = torch.optim.SGD(list(student.parameters()) + list(crd.parameters()), lr=0.05)
    bank0 = crd.memory.bank_student.clone()
    seen = []
    with FeatureTap(student, "1") as s_tap, FeatureTap(teacher, "1", detach=True) as t_tap:
        for x, y, index in loader:
            with torch.no_grad():
                t_logits = teacher(x)
            s_logits = student(x)
            loss = (
                0.1 * torch.nn.functional.cross_entropy(s_logits, y)
                + 0.9 * kd(s_logits, t_logits)
                + 0.8 * crd(s_tap["1"], t_tap["1"], index)
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen.append(index)
    changed = (crd.memory.bank_student != bank0).any(dim=1)
    assert torch.equal(changed.nonzero().flatten(), torch.cat(seen).sort().values)  # exactly the seen rows
    assert crd.embed_student.linear.weight.grad is not None


def test_last_occurrence_matches_python() -> None:
    from kdloss.functional.contrastive import _last_occurrence

    g = torch.Generator().manual_seed(5)
    for size in (0, 1, 2, 7, 30):
        idx = torch.randint(0, 5, (size,), generator=g)
        expected = [max(j for j in range(size) if idx[j] == idx[i]) for i in range(size)]
        assert _last_occurrence(idx).tolist() == expected


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 4),
    k=st.integers(1, 6),
    n=st.integers(8, 40),
    z=st.floats(0.5, 50.0),
    seed=st.integers(0, 2**16),
)
def test_nce_matches_reference_and_is_positive(b: int, k: int, n: int, z: float, seed: int) -> None:
    logits = torch.randn(b, k + 1, generator=torch.Generator().manual_seed(seed)) * 3
    ours = crd_nce_loss(logits, z, n)
    torch.testing.assert_close(ours, naive_nce(logits.exp() / z, n), rtol=1e-5, atol=1e-5)
    assert ours > 0  # every term is -log of a probability-like ratio in (0, 1)


# ------------------------------------------------------------------ crd_loss, CRDLoss(memory=...)


def test_crd_loss_adds_the_two_views_nce_losses() -> None:
    from kdloss.functional import crd_loss

    g = torch.Generator().manual_seed(3)
    ls, lt = torch.randn(B, K + 1, generator=g), torch.randn(B, K + 1, generator=g)
    z = torch.tensor([0.7, 1.9])
    per_row = crd_nce_loss(ls, z[0], N, reduction="none") + crd_nce_loss(lt, z[1], N, reduction="none")
    torch.testing.assert_close(crd_loss(ls, lt, z, N, reduction="none"), per_row)
    torch.testing.assert_close(crd_loss(ls, lt, z, N), per_row.sum() / B)
    torch.testing.assert_close(crd_loss(ls, lt, z, N, reduction="mean"), per_row.sum() / B)
    torch.testing.assert_close(crd_loss(ls, lt, z, N, reduction="sum"), per_row.sum())
    assert float(crd_loss(ls[:0], lt[:0], z, N)) == 0.0  # an empty batch gives 0, not NaN
    with pytest.raises(ShapeError, match=r"must have the same shape \(B, K\+1\), got \(6, 17\) and \(6, 16\)"):
        crd_loss(ls, lt[:, 1:], z, N)
    with pytest.raises(ShapeError, match=r"normalizers must have shape \(2,\)"):
        crd_loss(ls, lt, z[:1], N)
    with pytest.raises(ShapeError, match="at least one negative"):
        crd_loss(ls[:, :1], lt[:, :1], z, N)
    with pytest.raises(TypeError, match="n_data must be an int"):
        crd_loss(ls, lt, z, 6.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reduction must be one of"):
        crd_loss(ls, lt, z, N, reduction="avg")  # type: ignore[arg-type]


def test_the_memory_scores_and_owns_its_normalisers() -> None:
    crd, _ = _pair()
    fs, ft, idx, neg = _batch(0)
    v_s, v_t = crd.embed_student(fs), crd.embed_teacher(ft)
    crd.eval()  # no Z stored yet: the batch's own
    scores = crd.memory.score(v_s, v_t, idx, neg)
    torch.testing.assert_close(scores.normalizers, crd.memory.normalizers_for(*scores[:2], v_s, v_t))
    assert bool((crd.memory.normalizers == -1).all())  # evaluation stores nothing
    crd.train()
    crd(fs, ft, idx, negatives=neg)
    stored = crd.memory.normalizers.clone()
    assert bool((stored > 0).all())
    torch.testing.assert_close(crd.memory.score(v_s, v_t, idx, neg).normalizers, stored)


def test_crd_loss_takes_a_memory_or_its_keyword_arguments() -> None:
    fs, ft, idx, neg = _batch(1)
    torch.manual_seed(5)
    built = CRDLoss(S_DIM, T_DIM, N, feat_dim=D, n_negatives=K, temperature=0.1, momentum=0.3)
    torch.manual_seed(5)
    heads = (torch.nn.Linear(S_DIM, D), torch.nn.Linear(T_DIM, D))  # the same draws as CRDLoss's heads
    memory = ContrastMemory(N, D, n_negatives=K, temperature=0.1, momentum=0.3)
    given = CRDLoss(S_DIM, T_DIM, memory=memory)
    with torch.no_grad():
        given.embed_student.linear.load_state_dict(heads[0].state_dict())
        given.embed_teacher.linear.load_state_dict(heads[1].state_dict())
    assert given.memory is memory
    for a, b in zip(built.state_dict().values(), given.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(built(fs, ft, idx, negatives=neg), given(fs, ft, idx, negatives=neg), rtol=0, atol=0)
    assert CRDLoss(S_DIM, T_DIM, N, n_negatives=K).memory.feat_dim == 128  # the memory's default width
    assert CRDLoss(S_DIM, T_DIM, N, n_negatives=K, bank_dtype=torch.bfloat16).memory.bank_student.dtype == (
        torch.bfloat16
    )
    with pytest.raises(ValueError, match=r"pass the memory's settings \['n_negatives'\] to the ContrastMemory"):
        CRDLoss(S_DIM, T_DIM, memory=memory, n_negatives=K)
    with pytest.raises(ValueError, match="n_data=10 differs from the memory's n_data=64"):
        CRDLoss(S_DIM, T_DIM, 10, memory=memory)
    with pytest.raises(ValueError, match="feat_dim=4 differs from the memory's feat_dim=8"):
        CRDLoss(S_DIM, T_DIM, feat_dim=4, memory=memory)
    with pytest.raises(ValueError, match=r"CRDLoss needs n_data \(the dataset size"):
        CRDLoss(S_DIM, T_DIM)
    with pytest.raises(TypeError, match=r"memory must be a kdloss\.ContrastMemory, got Linear"):
        CRDLoss(S_DIM, T_DIM, memory=heads[0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dtype= or bank_dtype=, not both"):
        CRDLoss(S_DIM, T_DIM, N, n_negatives=K, dtype=torch.float32, bank_dtype=torch.float32)
    with pytest.raises(TypeError, match="unexpected keyword argument 'temprature'"):
        CRDLoss(S_DIM, T_DIM, N, n_negatives=K, temprature=0.1)


def test_training_score_returns_the_z_it_stored_without_recomputing_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """In training mode score() hands back the Z the step has just stored (set from this batch on the first
    step, the stored one after): computing it a second time (normalizers_for: an exp and a sum over all the
    logits) would double that work. The value is checked against Z written from its definition."""
    import kdloss.parts.contrastive as cmod

    mem = ContrastMemory(N, D, n_negatives=K).train()
    calls: list[str] = []
    real_sums = cmod._normalizer_sums
    monkeypatch.setattr(mem, "normalizers_for", lambda *a, **k: calls.append("normalizers_for"))
    monkeypatch.setattr(cmod, "_normalizer_sums", lambda *a, **k: calls.append("_normalizer_sums") or real_sums(*a))
    g = torch.Generator().manual_seed(3)
    for step in range(2):
        v_s = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=1)
        v_t = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=1)
        idx = torch.randperm(N, generator=g)[:B]
        neg = torch.randint(0, N, (B, K), generator=g)
        ls, lt, z = mem.score(v_s, v_t, idx, negatives=neg)
        assert calls == [], f"step {step}: {calls}"
        torch.testing.assert_close(z, mem.normalizers)
        if step == 0:  # Z = mean(exp(logits)) * n_data of this first batch, per view
            want = torch.stack([ls.double().exp().mean() * N, lt.double().exp().mean() * N]).float()
            torch.testing.assert_close(z, want, rtol=1e-5, atol=0)
            first = z.clone()
        else:  # the stored Z, not this batch's
            torch.testing.assert_close(z, first, rtol=0, atol=0)
