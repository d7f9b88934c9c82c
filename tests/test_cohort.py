"""Cohort losses (DIH, MHKD, TOFD, self-distillation) against the explicit loops of tests/naive/cohort.py."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F

from kdloss import CohortLoss, MultiHeadKDLoss, SelfDistillationLoss, ShapeError, TOFDAuthorsLoss, TOFDLoss
from kdloss.functional import (
    cohort_kd,
    orthogonality_penalty,
    paired_head_kd,
    self_distillation_loss,
    soft_kl,
    tofd_authors_loss,
    tofd_loss,
    tofd_temperature,
)
from tests.naive.cohort import (
    cohort_kl_div,
    cohort_loop,
    dih_per_head_alphas,
    mhkd_authors,
    orthogonality,
    orthogonality_authors,
    paired_loop,
    self_distillation_loop,
    tofd_authors,
)

B, C = 6, 7


def _data(k: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    student = (3 * torch.randn(B, C, generator=g)).to(dtype).requires_grad_()
    teachers = (3 * torch.randn(k, B, C, generator=g)).to(dtype).requires_grad_()
    labels = torch.randint(0, C, (B,), generator=g)
    return student, teachers, labels


# -- cohort_kd == the explicit loop -----------------------------------------------------------
@pytest.mark.parametrize("k", [1, 4, 5])
@pytest.mark.parametrize("form", ["authors", "normalized"])
@pytest.mark.parametrize("weights", [None, "random"])
def test_cohort_matches_loop_values_and_gradients(k: int, form: str, weights: str | None) -> None:
    student, teachers, labels = _data(k)
    w = None if weights is None else torch.rand(k, generator=torch.Generator().manual_seed(1)).add(0.1).tolist()
    out = cohort_kd(student, teachers, labels, temperature=5.0, alpha=0.1, weights=w, form=form)  # type: ignore[arg-type]
    s2 = student.detach().clone().requires_grad_()
    ref = cohort_loop(s2, list(teachers.detach()), labels, 5.0, 0.1, weights=w, form=form)
    torch.testing.assert_close(out.total, ref, rtol=1e-12, atol=1e-12)
    (g,) = torch.autograd.grad(out.total, student)
    (g_ref,) = torch.autograd.grad(ref, s2)
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)


def test_cohort_matches_textbook_kl_div() -> None:
    student, teachers, labels = _data(4)
    out = cohort_kd(student, teachers, labels, temperature=2.0, alpha=0.3)
    torch.testing.assert_close(out.total, cohort_kl_div(student, list(teachers), labels, 2.0, 0.3))


def test_authors_form_is_normalized_times_weight_sum() -> None:
    student, teachers, labels = _data(4)
    w = [1.0, 2.0, 0.5, 0.5]
    a = cohort_kd(student, teachers, labels, temperature=3.0, alpha=0.4, weights=w).total
    n = cohort_kd(student, teachers, labels, temperature=3.0, alpha=0.4, weights=w, form="normalized").total
    torch.testing.assert_close(a, n * sum(w))


def test_normalized_single_teacher_is_hinton_kd() -> None:
    student, teachers, labels = _data(1)
    n = cohort_kd(student, teachers, labels, temperature=4.0, alpha=0.9, weights=[3.0], form="normalized").total
    ref = 0.9 * soft_kl(student, teachers[0], temperature=4.0) + 0.1 * F.cross_entropy(student, labels)
    torch.testing.assert_close(n, ref)


def test_cohort_parts_per_head_and_input_layouts() -> None:
    student, teachers, labels = _data(3)
    stacked = cohort_kd(student, teachers, labels, temperature=2.0, alpha=0.5)
    listed = cohort_kd(student, list(teachers), labels, temperature=2.0, alpha=0.5)
    named = cohort_kd(student, dict(zip(["layer1", "layer2", "fc"], teachers)), labels, temperature=2.0, alpha=0.5)
    assert sorted(named.parts) == ["ce", "kd/fc", "kd/layer1", "kd/layer2", "total"]
    for j in range(3):
        expected = soft_kl(student, teachers[j], temperature=2.0)
        torch.testing.assert_close(stacked.parts[f"kd/{j}"], expected)
        torch.testing.assert_close(listed.parts[f"kd/{j}"], expected)
    torch.testing.assert_close(named.parts["kd/layer2"], stacked.parts["kd/1"])
    torch.testing.assert_close(stacked.parts["ce"], F.cross_entropy(student, labels))
    for v in stacked.parts.values():
        assert not v.requires_grad
    torch.testing.assert_close(stacked.parts["total"], stacked.total.detach())


def test_cohort_reductions() -> None:
    student, teachers, labels = _data(3)
    mean = cohort_kd(student, teachers, labels, temperature=2.0, alpha=0.2)
    summed = cohort_kd(student, teachers, labels, temperature=2.0, alpha=0.2, reduction="sum")
    rows = cohort_kd(student, teachers, labels, temperature=2.0, alpha=0.2, reduction="none")
    assert rows.total.shape == (B,)
    assert rows.parts["kd/0"].shape == (B,)
    assert rows.parts["ce"].shape == (B,)
    torch.testing.assert_close(summed.total, mean.total * B)
    torch.testing.assert_close(rows.total.mean(), mean.total)
    torch.testing.assert_close(summed.parts["kd/2"], mean.parts["kd/2"] * B)


def test_cohort_teachers_get_no_gradient() -> None:
    student, teachers, labels = _data(3)
    cohort_kd(student, teachers, labels, temperature=2.0, alpha=0.5).total.backward()
    assert student.grad is not None
    assert teachers.grad is None


def test_student_log_softmax_is_computed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, ...]] = []
    real = F.log_softmax

    def counting(x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return real(x, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(F, "log_softmax", counting)
    student, teachers, labels = _data(5)
    cohort_kd(student, teachers, labels, temperature=2.0, alpha=0.5)
    # one log-softmax of the student (B, C) and one of the stacked teachers (K, B, C), whatever K
    assert calls == [(B, C), (5, B, C)]


def test_cohort_gradcheck() -> None:
    student, teachers, labels = _data(3)

    def fn(s: torch.Tensor) -> torch.Tensor:
        return cohort_kd(s, teachers.detach(), labels, temperature=3.0, alpha=0.3, weights=[1.0, 0.5, 2.0]).total

    assert torch.autograd.gradcheck(fn, (student,))
    assert torch.autograd.gradgradcheck(fn, (student,))


def test_cohort_low_precision_and_extreme_logits() -> None:
    student, teachers, labels = _data(3, dtype=torch.float32)
    bf = cohort_kd(student.bfloat16(), teachers.bfloat16(), labels, temperature=2.0, alpha=0.5)
    assert bf.total.dtype == torch.float32
    ref = cohort_kd(student.bfloat16().float(), teachers.bfloat16().float(), labels, temperature=2.0, alpha=0.5)
    torch.testing.assert_close(bf.total, ref.total)
    extreme = teachers.detach().clone()
    extreme[0, :, 0] = 100.0
    extreme[1, :, 1] = float("-inf")
    out = cohort_kd(student * 30, extreme, labels, temperature=1.0, alpha=0.5)
    out.total.backward()
    assert torch.isfinite(out.total)
    assert student.grad is not None
    assert torch.isfinite(student.grad).all()


def test_cohort_module_equals_function_and_round_trips() -> None:
    student, teachers, labels = _data(4)
    module = CohortLoss(temperature=5.0, alpha=0.1, weights=[1, 1, 1, 2], form="normalized")
    assert repr(module) == (
        "CohortLoss(temperature=5.0, alpha=0.1, form='normalized', reduction='batchmean', weights=[1.0, 1.0, 1.0, 2.0])"
    )
    fn = cohort_kd(student, teachers, labels, temperature=5.0, alpha=0.1, weights=[1, 1, 1, 2], form="normalized")
    torch.testing.assert_close(module(student, teachers, labels).total, fn.total)
    clone = pickle.loads(pickle.dumps(module))
    torch.testing.assert_close(clone(student, teachers, labels).total, fn.total)
    assert module.state_dict() == {}


def test_cohort_compiles_fullgraph() -> None:
    student, teachers, labels = _data(3, dtype=torch.float32)
    student, teachers = student.detach(), teachers.detach()

    def fn(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return cohort_kd(s, t, y, temperature=4.0, alpha=0.5).total

    compiled = torch.compile(fn, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(student, teachers, labels), fn(student, teachers, labels))


# -- bad input ------------------------------------------------------------------------------------
def test_cohort_mismatched_class_counts() -> None:
    student, teachers, labels = _data(2)
    with pytest.raises(
        ShapeError, match=r"same classes: teacher_logits\[1\] has 5 classes and teacher_logits\[0\] has 7"
    ):
        cohort_kd(student, [teachers[0], teachers[1][:, :5]], labels)
    with pytest.raises(ShapeError, match=r"same classes: teacher_logits\[0\] has 9 classes and student_logits has 7"):
        cohort_kd(student, torch.zeros(2, B, 9, dtype=torch.float64), labels)
    with pytest.raises(ShapeError, match=r"batch size 4 vs 6"):
        cohort_kd(student, torch.zeros(2, 4, C, dtype=torch.float64), labels)


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan")])
def test_alpha_outside_unit_interval(alpha: float) -> None:
    student, teachers, labels = _data(2)
    with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\], got"):
        cohort_kd(student, teachers, labels, alpha=alpha)
    with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\]"):
        CohortLoss(alpha=alpha)
    with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\]"):
        paired_head_kd(teachers, teachers, labels, alpha=alpha)
    with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\]"):
        SelfDistillationLoss(alpha=alpha)


def test_cohort_other_bad_arguments() -> None:
    student, teachers, labels = _data(3)
    with pytest.raises(ValueError, match=r"one weight per teacher \(3\), got 2"):
        cohort_kd(student, teachers, labels, weights=[1.0, 1.0])
    with pytest.raises(ValueError, match=r"weights\[1\] must be a finite number >= 0, got -1.0"):
        cohort_kd(student, teachers, labels, weights=[1.0, -1.0, 1.0])
    with pytest.raises(ValueError, match="must not all be zero"):
        CohortLoss(weights=[0.0, 0.0])
    with pytest.raises(ValueError, match="form must be one of 'authors', 'normalized', got 'mean'"):
        cohort_kd(student, teachers, labels, form="mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reduction must be one of 'none', 'batchmean', 'sum', got 'mean'"):
        CohortLoss(reduction="mean")
    with pytest.raises(ValueError, match="temperature must be a finite number > 0, got 0"):
        cohort_kd(student, teachers, labels, temperature=0)
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        cohort_kd(student, teachers, labels.double())
    with pytest.raises(ShapeError, match=r"labels must have shape \(B,\) = \(6,\), got \(5,\)"):
        cohort_kd(student, teachers, labels[:5])
    with pytest.raises(ShapeError, match=r"\(K, B, C\) tensor"):
        cohort_kd(student, teachers[0], labels)
    with pytest.raises(ValueError, match="at least one set of logits"):
        cohort_kd(student, [], labels)
    with pytest.raises(TypeError, match="floating-point"):
        cohort_kd(student, teachers.long(), labels)


# -- MHKD ----------------------------------------------------------------------------------------
def test_paired_head_kd_matches_loop() -> None:
    g = torch.Generator().manual_seed(3)
    s = torch.randn(4, B, C, generator=g, dtype=torch.float64).requires_grad_()
    t = torch.randn(4, B, C, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (B,), generator=g)
    out = paired_head_kd(list(s), t, y, temperature=3.0, alpha=0.7)
    ref = paired_loop(list(s), list(t), y, 3.0, 0.7)
    torch.testing.assert_close(out.total, ref)
    torch.testing.assert_close(torch.autograd.grad(out.total, s)[0], torch.autograd.grad(ref, s)[0])
    torch.testing.assert_close(out.parts["kd/2"], soft_kl(s[2], t[2], temperature=3.0))
    torch.testing.assert_close(out.parts["ce/1"], F.cross_entropy(s[1], y))
    torch.testing.assert_close(MultiHeadKDLoss(3.0, alpha=0.7)(s, t, y).total, out.total)
    weighted = paired_head_kd(s, t, y, temperature=3.0, alpha=0.7, weights=[0, 0, 1, 0])
    torch.testing.assert_close(weighted.total, paired_loop([s[2]], [t[2]], y, 3.0, 0.7))
    with pytest.raises(ShapeError, match=r"same number of heads .* got 4 and 3"):
        paired_head_kd(s, t[:3], y)
    with pytest.raises(ShapeError, match="same classes"):
        paired_head_kd(s, t[..., :5], y)


# -- TOFD ----------------------------------------------------------------------------------------
def test_orthogonality_penalty_matches_loop_and_is_zero_when_orthogonal() -> None:
    g = torch.Generator().manual_seed(4)
    for shape in [(5, 3), (3, 5), (4, 2, 3, 3)]:
        w = torch.randn(*shape, generator=g, dtype=torch.float64)
        torch.testing.assert_close(orthogonality_penalty(w), orthogonality(w))
    q, _ = torch.linalg.qr(torch.randn(6, 4, generator=g, dtype=torch.float64))
    assert orthogonality_penalty(q).item() == pytest.approx(0.0, abs=1e-12)
    assert orthogonality_penalty(q.t()).item() == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ShapeError, match="at least 2 dimensions"):
        orthogonality_penalty(torch.ones(3))


def test_tofd_loss_is_paired_kd_plus_features_plus_orthogonality() -> None:
    g = torch.Generator().manual_seed(5)
    s = torch.randn(3, B, C, generator=g, dtype=torch.float64).requires_grad_()
    t = torch.randn(3, B, C, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (B,), generator=g)
    fs = [torch.randn(B, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    ft = [torch.randn(B, 8, generator=g, dtype=torch.float64) for _ in range(3)]
    adapter = torch.randn(8, 8, generator=g, dtype=torch.float64, requires_grad=True)
    out = tofd_loss(s, t, y, fs, ft, adapter_weights=[adapter], temperature=2.0, alpha=0.5, beta=0.3, gamma=0.01)
    ref = (
        paired_loop(list(s), list(t), y, 2.0, 0.5)
        + 0.3 * sum(F.mse_loss(a, b) for a, b in zip(fs, ft))
        + 0.01 * orthogonality(adapter)
    )
    torch.testing.assert_close(out.total, ref)
    grads = torch.autograd.grad(out.total, [s, *fs, adapter])
    grads_ref = torch.autograd.grad(ref, [s, *fs, adapter])
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b)
    module = TOFDLoss(2.0, alpha=0.5, beta=0.3, gamma=0.01)
    torch.testing.assert_close(module(s, t, y, fs, ft, [adapter]).total, out.total)
    assert sorted(out.parts) == [
        "ce/0",
        "ce/1",
        "ce/2",
        "feat/0",
        "feat/1",
        "feat/2",
        "kd/0",
        "kd/1",
        "kd/2",
        "orth",
        "total",
    ]
    with pytest.raises(ValueError, match=r"one feature per head pair \(3\), got 2 and 3"):
        tofd_loss(s, t, y, fs[:2], ft)
    with pytest.raises(ValueError, match="gamma must be a finite number >= 0, got -1"):
        TOFDLoss(gamma=-1)
    with pytest.raises(ShapeError, match="same shape"):
        tofd_loss(s, t, y, [f[:, :4] for f in fs], ft)


def test_orthogonality_penalty_authors_variant_matches_reference() -> None:
    """variant="authors": ||W W^T - I||_F + ||W^T W - I||_F, unsquared (float64, values and gradients)."""
    g = torch.Generator().manual_seed(6)
    for shape in [(5, 3), (3, 5), (4, 2, 3, 3)]:
        w = torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
        ours = orthogonality_penalty(w, variant="authors")
        ref = orthogonality_authors(w)
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(torch.autograd.grad(ours, w)[0], torch.autograd.grad(ref, w)[0])
    q, _ = torch.linalg.qr(torch.randn(6, 4, generator=g, dtype=torch.float64))
    assert orthogonality_penalty(q).item() == pytest.approx(0.0, abs=1e-12)  # kdloss: the smaller Gram only
    # Q^T Q = I, but Q Q^T is a rank-4 projection in 6 dimensions: ||Q Q^T - I||_F = sqrt(6 - 4)
    assert orthogonality_penalty(q, variant="authors").item() == pytest.approx(2**0.5, abs=1e-9)
    square, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))
    square.requires_grad_(True)
    zero = orthogonality_penalty(square, variant="authors")
    assert zero.item() == pytest.approx(0.0, abs=1e-12)
    assert torch.isfinite(torch.autograd.grad(zero, square)[0]).all()
    with pytest.raises(ValueError, match=r"variant must be one of 'kdloss', 'authors', got 'paper'"):
        orthogonality_penalty(q, variant="paper")  # type: ignore[arg-type]


def test_tofd_temperature_schedule() -> None:
    assert tofd_temperature(0) == pytest.approx(1.012)
    assert tofd_temperature(199) == pytest.approx(1 + 3 * 200 / 250)
    assert tofd_temperature(9, t=5.0, horizon=100.0) == pytest.approx(1.5)
    with pytest.raises(ValueError, match=r"epoch must be an int >= 0 \(0-based\), got -1"):
        tofd_temperature(-1)
    with pytest.raises(TypeError, match=r"epoch must be an int >= 0 \(0-based\), got float"):
        tofd_temperature(1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"horizon must be a finite number > 0, got 0"):
        tofd_temperature(1, horizon=0)


def _tofd_data(k: int = 3, d_s: int = 5, d_t: int = 8, seed: int = 7):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    s = (2 * torch.randn(k, B, C, generator=g, dtype=torch.float64)).requires_grad_()
    t = 2 * torch.randn(k, B, C, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (B,), generator=g)
    fs = [torch.randn(B, d_s, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(k)]
    ft = [torch.randn(B, d_t, generator=g, dtype=torch.float64) for _ in range(k)]
    adapters = [torch.randn(d_t, d_s, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(k)]
    return s, t, y, fs, ft, adapters


@pytest.mark.parametrize(("d_s", "d_t"), [(5, 8), (8, 8)])
def test_tofd_authors_loss_matches_the_authors_formula(d_s: int, d_t: int) -> None:
    """Soft CE without T^2 (weight 1) + CE (weight 1) per pair at the epoch's temperature, the unsquared
    L2 of the adapted features over the batch, the unsquared orthogonality of both Gram matrices; the
    bias-free adapter is there even at equal widths (float64, values and gradients)."""
    s, t, y, fs, ft, adapters = _tofd_data(d_s=d_s, d_t=d_t)
    epoch = 7
    out = tofd_authors_loss(
        s, t, y, fs, ft, adapters, temperature=tofd_temperature(epoch), feature_weight=0.05, orth_weight=0.03
    )
    ref = tofd_authors(list(s), list(t), y, fs, ft, adapters, epoch)
    torch.testing.assert_close(out.total, ref, rtol=1e-12, atol=1e-12)
    inputs = [s, *fs, *adapters]
    for a, b in zip(torch.autograd.grad(out.total, inputs), torch.autograd.grad(ref, inputs)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    module = TOFDAuthorsLoss(feature_weight=0.05, orth_weight=0.03)
    torch.testing.assert_close(module(s, t, y, fs, ft, adapters, epoch=epoch).total, out.total)
    assert sorted(out.parts) == sorted(
        [*(f"{n}/{j}" for n in ("soft_ce", "ce", "feat") for j in range(3)), "orth", "total"]
    )
    temperature = tofd_temperature(epoch)
    soft_ce_0 = -(F.softmax(t[0] / temperature, 1) * F.log_softmax(s[0].detach() / temperature, 1)).sum(1).mean()
    torch.testing.assert_close(out.parts["soft_ce/0"], soft_ce_0)
    torch.testing.assert_close(out.parts["feat/1"], torch.dist(fs[1].detach() @ adapters[1].detach().t(), ft[1]))


def test_tofd_kdloss_variant_maps_onto_the_authors_logit_gradient() -> None:
    """alpha = 1/(1+T^2) and pair weights (1+T^2)/T^2 give kdloss's TOFD the authors' logit gradient;
    the values differ by the teachers' entropies (the soft CE is KL + H(p_t))."""
    s, t, y, fs, ft, adapters = _tofd_data()
    temperature = tofd_temperature(30)
    t2 = temperature**2
    mapped = [f @ a.t() for f, a in zip(fs, adapters)]
    ours = tofd_loss(
        s, t, y, mapped, ft, temperature=temperature, alpha=1 / (1 + t2), weights=[(1 + t2) / t2] * 3, beta=0.0
    )
    authors = tofd_authors_loss(s, t, y, fs, ft, adapters, temperature=temperature, feature_weight=0.0, orth_weight=0.0)
    (g_ours,) = torch.autograd.grad(ours.total, s)
    (g_authors,) = torch.autograd.grad(authors.total, s)
    torch.testing.assert_close(g_ours, g_authors, rtol=1e-12, atol=1e-12)
    p = F.softmax(t / temperature, dim=-1)
    entropy = -(p * p.log()).sum(-1).mean(-1).sum()
    torch.testing.assert_close(authors.total - ours.total, entropy, rtol=1e-12, atol=1e-12)


def test_tofd_authors_loss_errors() -> None:
    s, t, y, fs, ft, adapters = _tofd_data()
    with pytest.raises(ShapeError, match=r"one entry per pair \(3\), got 3, 3 and 2 \(the authors' TOFD always"):
        tofd_authors_loss(s, t, y, fs, ft, adapters[:2], temperature=2.0)
    with pytest.raises(ShapeError, match=r"adapter_weights\[0\] \(D_t, D_s\) = \(8, 5\), got \(5, 8\)"):
        tofd_authors_loss(s, t, y, fs, ft, [a.t() for a in adapters], temperature=2.0)
    with pytest.raises(ShapeError, match=r"adapter_weights\[1\] must be the \(D_t, D_s\) weight of an nn\.Linear"):
        tofd_authors_loss(s, t, y, fs, ft, [adapters[0], adapters[1][0], adapters[2]], temperature=2.0)
    with pytest.raises(ValueError, match=r"temperature must be a finite number > 0, got 0"):
        tofd_authors_loss(s, t, y, fs, ft, adapters, temperature=0)
    with pytest.raises(ValueError, match=r"feature_weight must be a finite number >= 0, got -1"):
        TOFDAuthorsLoss(feature_weight=-1)
    with pytest.raises(ShapeError, match=r"same number of outputs \(paired\), got 3 and 2"):
        tofd_authors_loss(s, t[:2], y, fs, ft, adapters, temperature=2.0)
    assert repr(TOFDAuthorsLoss()) == "TOFDAuthorsLoss(feature_weight=0.05, orth_weight=0.03, t=3.0, horizon=250.0)"
    assert not list(TOFDAuthorsLoss().parameters())


# -- MHKD against the DIH authors' MHKD step ---------------------------------------------------------
def test_mhkd_student_gradients_equal_the_authors_with_head_weights() -> None:
    """The authors train the teacher's heads inside the same loss (CE on them, KD not detached) and weigh
    each intermediate pair 0.5; kdloss detaches the (fine-tuned) teacher heads. With weights 0.5 per head
    pair and 1 for the final pair, the student's gradients are identical (float64)."""
    g = torch.Generator().manual_seed(8)
    k = 3  # intermediate pairs
    students = [torch.randn(B, C, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(k + 1)]
    teachers = [torch.randn(B, C, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(k + 1)]
    y = torch.randint(0, C, (B,), generator=g)
    authors = mhkd_authors(students, teachers, y, alpha=0.1, temperature=4.0)  # pair 0: the final classifiers
    ours = paired_head_kd(
        [*students[1:], students[0]], [*teachers[1:], teachers[0]], y, temperature=4.0, alpha=0.1,
        weights=[0.5] * k + [1.0],
    ).total  # fmt: skip
    g_authors = torch.autograd.grad(authors, students, retain_graph=True)
    g_ours = torch.autograd.grad(ours, students, retain_graph=True)
    for a, b in zip(g_ours, g_authors):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # the authors' loss also trains the teacher's heads; kdloss's never reaches the teacher
    assert all(x is not None for x in torch.autograd.grad(authors, teachers[1:], retain_graph=True))
    assert all(x is None for x in torch.autograd.grad(ours, teachers, allow_unused=True))


# -- DIH: the authors' per-head alphas --------------------------------------------------------------
@pytest.mark.parametrize("alphas", [[0.1, 0.1, 0.1, 0.1], [0.1, 0.3, 0.05, 0.2], [0.2, 0.0, 0.4, 0.1]])
def test_dih_per_head_alphas_map_to_one_alpha_and_weights(alphas: list[float]) -> None:
    """The authors allow one alpha per head (kd_alpha dict; a head with alpha 0 is skipped, its CE too).
    kdloss's authors form reproduces it with alpha = mean of the non-zero alphas and w_j = alpha_j / alpha
    (w_j = 0 for a skipped head), values and gradients (float64)."""
    student, teachers, labels = _data(len(alphas))
    active = [a for a in alphas if a != 0.0]
    alpha = sum(active) / len(active)
    weights = [a / alpha for a in alphas]
    out = cohort_kd(student, teachers, labels, temperature=5.0, alpha=alpha, weights=weights)
    s2 = student.detach().clone().requires_grad_()
    ref = dih_per_head_alphas(s2, list(teachers.detach()), labels, alphas, 5.0)
    torch.testing.assert_close(out.total, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        torch.autograd.grad(out.total, student)[0], torch.autograd.grad(ref, s2)[0], rtol=1e-12, atol=1e-12
    )


# -- self-distillation ---------------------------------------------------------------------------
def test_self_distillation_matches_loop() -> None:
    g = torch.Generator().manual_seed(6)
    exits = torch.randn(3, B, C, generator=g, dtype=torch.float64, requires_grad=True)
    final = torch.randn(B, C, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, C, (B,), generator=g)
    fe = [torch.randn(B, 16, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    ff = torch.randn(B, 16, generator=g, dtype=torch.float64, requires_grad=True)
    out = self_distillation_loss(
        exits, final, y, exit_features=fe, final_feature=ff, temperature=3.0, alpha=0.3, beta=0.1
    )
    ref = self_distillation_loop(list(exits), final, y, 3.0, 0.3, 0.1, fe, ff)
    torch.testing.assert_close(out.total, ref)
    inputs = [exits, final, *fe]  # the final feature is the teacher of the hints: detached
    for a, b in zip(torch.autograd.grad(out.total, inputs, retain_graph=True), torch.autograd.grad(ref, inputs)):
        torch.testing.assert_close(a, b)
    # the deepest classifier's gradient comes from its own CE only: it teaches, it is not pulled
    (g_final,) = torch.autograd.grad(out.total, final)
    (g_ce,) = torch.autograd.grad(F.cross_entropy(final, y), final)
    torch.testing.assert_close(g_final, g_ce)
    module = SelfDistillationLoss(3.0, alpha=0.3, beta=0.1)
    torch.testing.assert_close(module(exits, final, y, fe, ff).total, out.total)
    no_feat = self_distillation_loss(exits, final, y, temperature=3.0, alpha=0.3)
    torch.testing.assert_close(no_feat.total, self_distillation_loop(list(exits), final, y, 3.0, 0.3, 0.0))
    with pytest.raises(ValueError, match="must be given together"):
        self_distillation_loss(exits, final, y, exit_features=fe)
    with pytest.raises(ShapeError, match="same classes"):
        self_distillation_loss(exits[..., :4], final, y)


# -- invariants --------------------------------------------------------------------------------------
def test_cohort_invariants() -> None:
    student, teachers, labels = _data(4)
    base = cohort_kd(student, teachers, labels, temperature=2.0, alpha=0.6, weights=[1, 2, 3, 4])
    # the order of the teachers does not matter once their weights follow them
    perm = cohort_kd(student, teachers[[2, 0, 3, 1]], labels, temperature=2.0, alpha=0.6, weights=[3, 1, 4, 2])
    torch.testing.assert_close(perm.total, base.total)
    # a cohort of copies of the student: every KD part is 0, the total is the CE counted K times
    copies = student.detach().expand(4, B, C)
    same = cohort_kd(student, copies, labels, temperature=2.0, alpha=0.6)
    for j in range(4):
        assert same.parts[f"kd/{j}"].abs().item() < 1e-12
    torch.testing.assert_close(same.total, 4 * 0.4 * F.cross_entropy(student, labels))
    # shifting any logits row by a constant changes nothing
    shifted = cohort_kd(student + 5.0, teachers - 3.0, labels, temperature=2.0, alpha=0.6, weights=[1, 2, 3, 4])
    torch.testing.assert_close(shifted.total, base.total)
    # alpha = 0 is the cross-entropy alone (K times), alpha = 1 the KD alone
    ce_only = cohort_kd(student, teachers, labels, temperature=2.0, alpha=0.0)
    torch.testing.assert_close(ce_only.total, 4 * F.cross_entropy(student, labels))
    kd_only = cohort_kd(student, teachers, labels, temperature=2.0, alpha=1.0)
    torch.testing.assert_close(kd_only.total, sum(soft_kl(student, t, temperature=2.0) for t in teachers))


def test_head_losses_compile_fullgraph() -> None:
    g = torch.Generator().manual_seed(7)
    s, t = torch.randn(3, B, C, generator=g), torch.randn(3, B, C, generator=g)
    y = torch.randint(0, C, (B,), generator=g)
    fs, ft, w = [torch.randn(B, 4, generator=g)] * 3, [torch.randn(B, 4, generator=g)] * 3, torch.randn(4, 4)

    def fn(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        mhkd = paired_head_kd(s, t, y, temperature=2.0, alpha=0.5).total
        tofd = tofd_loss(s, t, y, fs, ft, adapter_weights=[w], temperature=2.0, beta=0.1, gamma=0.01).total
        byot = self_distillation_loss(s, t[0], y, exit_features=fs, final_feature=ft[0]).total
        return mhkd + tofd + byot

    compiled = torch.compile(fn, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(s, t, y), fn(s, t, y))


def test_multihead_repr_shows_weights() -> None:
    """MultiHeadKDLoss's repr left out its per-pair weights (CohortLoss shows them)."""
    from kdloss import MultiHeadKDLoss

    assert "weights=[1.0, 2.0]" in repr(MultiHeadKDLoss(weights=[1.0, 2.0]))
    assert "weights" not in repr(MultiHeadKDLoss())


def test_labels_out_of_range_name_the_argument() -> None:
    """A label >= C reached F.cross_entropy and failed there with a bare IndexError (CPU)."""
    from kdloss.functional import cohort_kd, paired_head_kd, self_distillation_loss

    z, bad = torch.zeros(2, 3), torch.tensor([0, 3])
    calls = (
        lambda: cohort_kd(z, z.unsqueeze(0), bad),
        lambda: paired_head_kd(z.unsqueeze(0), z.unsqueeze(0), bad),
        lambda: self_distillation_loss(z.unsqueeze(0), z, bad),
    )
    for call in calls:
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\) \(C = 3\), got values in \[0, 3\]"):
            call()


def test_self_distillation_validates_before_computing() -> None:
    """beta and the exit-feature count were checked only after the KD/CE terms had been computed."""
    from kdloss.functional import self_distillation_loss

    z, y = torch.zeros(2, 3), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"beta must be a finite number >= 0, got -1"):
        self_distillation_loss(z.unsqueeze(0), z, torch.tensor([0, 3]), beta=-1.0)  # labels bad too
    with pytest.raises(ValueError, match=r"exit_features must hold one feature per exit \(1\), got 2"):
        self_distillation_loss(z.unsqueeze(0), z, y, exit_features=[z, z], final_feature=z)
