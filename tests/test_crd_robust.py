"""CRD under bad batches: non-finite samples never reach the banks or Z, an empty first batch does
not poison Z, a refused ``load_state_dict`` changes nothing, half-precision inputs outside autocast."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from kdloss import ConvAdapter, CRDLoss, LinearAdapter, ShapeError
from kdloss.functional import crd_embed, crd_memory_update, crd_update_rows
from tests.test_crd import _forbid_host_reads

N, S_DIM, T_DIM, D, K, B = 64, 12, 10, 8, 16, 6


def _crd(validate: bool = True, seed: int = 0) -> CRDLoss:
    torch.manual_seed(seed)
    return CRDLoss(S_DIM, T_DIM, N, feat_dim=D, n_negatives=K, validate=validate)


def _batch(seed: int, b: int = B) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    fs = torch.randn(b, S_DIM, generator=g)
    ft = torch.randn(b, T_DIM, generator=g)
    idx = torch.randperm(N, generator=g)[:b]
    neg = torch.randint(0, N, (b, K), generator=g)
    return fs, ft, idx, neg


def _state(crd: CRDLoss) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in crd.state_dict().items()}


def _poison(fs: torch.Tensor, ft: torch.Tensor, row: int, where: str, value: float) -> None:
    (fs if where == "student" else ft)[row, 0] = value


@pytest.mark.parametrize("validate", [True, False])
@pytest.mark.parametrize("where", ["student", "teacher"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("first_step", [True, False], ids=["first-step", "later-step"])
def test_a_non_finite_sample_never_reaches_the_banks_or_z(
    validate: bool, where: str, value: float, first_step: bool
) -> None:
    """The bad sample's rows keep their values; every other row, and Z, are what a batch without it gives."""
    bad, clean = _crd(validate), _crd(validate)
    if not first_step:  # Z already set by an earlier clean step
        fs0, ft0, idx0, neg0 = _batch(10)
        bad(fs0, ft0, idx0, negatives=neg0).backward()
        clean(fs0, ft0, idx0, negatives=neg0).backward()
    fs, ft, idx, neg = _batch(0)
    _poison(fs, ft, 1, where, value)
    keep = torch.tensor([i != 1 for i in range(B)])
    before = _state(bad)
    loss = bad(fs, ft, idx, negatives=neg)
    assert torch.isnan(loss)  # honest: the step saw a bad sample
    clean(fs[keep], ft[keep], idx[keep], negatives=neg[keep])
    after, ref = bad.state_dict(), clean.state_dict()
    for name in ("memory.bank_student", "memory.bank_teacher"):
        assert torch.isfinite(after[name]).all()
        assert torch.equal(after[name][idx[1]], before[name][idx[1]]), name  # the bad sample's row: untouched
        torch.testing.assert_close(after[name], ref[name], rtol=1e-6, atol=1e-7)  # B=6 vs 5: rounding only
    torch.testing.assert_close(after["memory.normalizers"], ref["memory.normalizers"], rtol=1e-6, atol=0)
    assert int(bad.memory.skipped_rows) == 1
    # every later clean step is as if the bad sample had never been there (and the next call reports it)
    fs2, ft2, idx2, neg2 = _batch(1)
    with pytest.warns(RuntimeWarning, match="1 of 6 samples") if validate else warnings.catch_warnings():
        out = bad(fs2, ft2, idx2, negatives=neg2)
    assert torch.isfinite(out)
    torch.testing.assert_close(out, clean(fs2, ft2, idx2, negatives=neg2), rtol=1e-6, atol=1e-6)


def test_the_warning_comes_once_and_the_count_keeps_growing() -> None:
    """Warned at the next call, whose index check reads values anyway: no extra synchronisation."""
    crd = _crd()
    for step in range(4):
        fs, ft, idx, neg = _batch(step)
        if step < 3:
            fs[step, 0] = float("nan")
            ft[(step + 1) % B, 0] = float("nan")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            crd(fs, ft, idx, negatives=neg)
        got = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(got) == (1 if step == 1 else 0), (step, got)
        if got:
            assert "2 of 6 samples of the previous training step" in got[0]
    assert int(crd.memory.skipped_rows) == 6
    assert "skipped_rows" not in crd.state_dict()  # a diagnostic, not training state


def test_validate_false_skips_non_finite_samples_without_reading_a_value() -> None:
    crd = _crd(validate=False)
    fs, ft, idx, neg = _batch(0)
    fs[2, 3] = float("nan")
    with _forbid_host_reads():
        crd(fs, ft, idx, negatives=neg)
        crd(*_batch(1)[:3])
    assert torch.isfinite(crd.memory.bank_student).all()
    assert torch.isfinite(crd.memory.normalizers).all()
    assert int(crd.memory.skipped_rows) == 1


@pytest.mark.parametrize("validate", [True, False])
@pytest.mark.parametrize("first", ["empty", "all-nan"])
def test_an_unusable_first_batch_leaves_z_for_the_next_batch(validate: bool, first: str) -> None:
    crd, fresh = _crd(validate), _crd(validate)
    if first == "empty":
        loss0 = crd(torch.randn(0, S_DIM), torch.randn(0, T_DIM), torch.zeros(0, dtype=torch.long))
        assert loss0.item() == 0.0
    else:
        fs, ft, idx, neg = _batch(5)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            assert torch.isnan(crd(fs * float("nan"), ft, idx, negatives=neg))
    assert torch.equal(crd.memory.normalizers, torch.tensor([-1.0, -1.0]))  # still unset, not NaN
    fs, ft, idx, neg = _batch(0)
    reported = first == "all-nan" and validate  # the next call reports the skipped samples
    with pytest.warns(RuntimeWarning, match="6 of 6 samples") if reported else warnings.catch_warnings():
        out = crd(fs, ft, idx, negatives=neg)
    assert torch.isfinite(out)
    torch.testing.assert_close(out, fresh(fs, ft, idx, negatives=neg))
    torch.testing.assert_close(crd.memory.normalizers, fresh.memory.normalizers)
    assert bool((crd.memory.normalizers > 0).all())


def test_eval_before_training_takes_z_from_the_finite_samples() -> None:
    crd = _crd().eval()
    mem = crd.memory
    fs, ft, idx, neg = _batch(0)
    fs[0, 0] = float("nan")
    v_s, v_t = crd.embed_student(fs), crd.embed_teacher(ft)
    ls, lt = mem(v_s, v_t, idx, neg)
    z = mem.normalizers_for(ls, lt, v_s, v_t)
    z_clean = mem.normalizers_for(ls[1:], lt[1:], v_s[1:], v_t[1:])
    torch.testing.assert_close(z, z_clean, rtol=1e-6, atol=0)
    assert torch.isnan(crd(fs, ft, idx, negatives=neg))  # the NaN sample's own term
    assert torch.equal(mem.normalizers, torch.tensor([-1.0, -1.0]))  # eval stores nothing


def test_a_duplicated_index_takes_its_last_finite_embedding() -> None:
    bank = torch.nn.functional.normalize(torch.randn(5, 3), dim=1)
    emb = torch.randn(4, 3)
    emb[3] = float("nan")  # the last occurrence of index 2 is bad: the one before it wins
    rows = crd_update_rows(bank, torch.tensor([2, 0, 2, 2]), emb)
    ref = crd_update_rows(bank, torch.tensor([2, 0, 2]), emb[:3])
    assert torch.equal(rows[:3], ref)
    assert torch.equal(rows[3], ref[2])  # every occurrence writes the same row
    only_bad = crd_update_rows(bank, torch.tensor([4]), torch.full((1, 3), float("inf")))
    assert torch.equal(only_bad[0], bank[4])  # kept as it was
    assert torch.isfinite(crd_memory_update(bank, torch.tensor([1, 4]), torch.full((2, 3), float("nan")))).all()


# ------------------------------------------------------------------------------------------ load_state_dict


def test_a_refused_load_leaves_the_module_bit_identical() -> None:
    """Another n_data used to overwrite both embedding heads before the memory raised."""
    src = _crd(seed=1)
    src(*_batch(0)[:3])
    for state, exc, match in [
        (CRDLoss(S_DIM, T_DIM, N + 1, feat_dim=D, n_negatives=K).state_dict(), ShapeError, r"\(65, 8\).*\(64, 8\)"),
        ({k: v for k, v in src.state_dict().items() if k != "memory.normalizers"}, RuntimeError, "missing key"),
        ({**src.state_dict(), "memory.extra": torch.zeros(1)}, RuntimeError, "unexpected key"),
        ({**src.state_dict(), "embed_teacher.linear.weight": torch.zeros(D, 3)}, ShapeError, "embed_teacher"),
        ({**src.state_dict(), "memory.bank_teacher": torch.full((N, D), float("nan"))}, ValueError, "poisoned"),
        ({**src.state_dict(), "memory.normalizers": torch.tensor([float("nan"), 1.0])}, ValueError, r"Z\)"),
        ({**src.state_dict(), "embed_student.linear.bias": [0.0] * D}, TypeError, "must be a tensor"),
    ]:
        dst = _crd(seed=2)
        dst(*_batch(3)[:3])
        before = _state(dst)
        with pytest.raises(exc, match=match):
            dst.load_state_dict(state)
        after = dst.state_dict()
        assert after.keys() == before.keys()
        assert all(torch.equal(after[k], before[k]) for k in before), match


def test_a_refused_load_inside_a_parent_module_leaves_crd_untouched() -> None:
    parent, other = torch.nn.ModuleDict({"crd": _crd(seed=1)}), torch.nn.ModuleDict({"crd": _crd(seed=2)})
    state = parent.state_dict()
    state["crd.memory.bank_student"] = torch.zeros(N + 1, D)
    before = _state(other["crd"])  # type: ignore[arg-type]
    with pytest.raises(ShapeError):
        other.load_state_dict(state)
    assert all(torch.equal(v, other["crd"].state_dict()[k]) for k, v in before.items())


def test_non_strict_load_still_checks_shapes_and_loads_the_rest() -> None:
    src, dst = _crd(seed=1), _crd(seed=2)
    state = {k: v for k, v in src.state_dict().items() if not k.startswith("memory.")}
    dst.load_state_dict(state, strict=False)
    assert torch.equal(dst.embed_student.linear.weight, src.embed_student.linear.weight)


# ------------------------------------------------------------------------------------------ half inputs


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_outside_autocast_compute_in_the_parameters_dtype(dtype: torch.dtype) -> None:
    fs, ft, idx, neg = _batch(0)
    a, b = _crd(), copy.deepcopy(_crd())
    got = a(fs.to(dtype), ft.to(dtype), idx, negatives=neg)
    want = b(fs.to(dtype).float(), ft.to(dtype).float(), idx, negatives=neg)
    assert torch.equal(got, want)
    w = torch.randn(D, S_DIM)
    assert torch.equal(crd_embed(fs.to(dtype), w), crd_embed(fs.to(dtype).float(), w))
    assert crd_embed(fs.to(dtype), w.to(dtype)).dtype == dtype  # same dtypes: computed as they are
    for adapter, x in [(ConvAdapter(3, 4, 3, bn=True), torch.randn(2, 3, 5, 5)), (LinearAdapter(12, 5), fs)]:
        out = adapter(x.to(dtype))
        assert out.dtype == torch.float32
        assert torch.equal(out, adapter(x.to(dtype).float()))
