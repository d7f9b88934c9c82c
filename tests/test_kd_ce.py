"""kd_ce_loss / KDCELoss (eager path): against the naive formulation, rows that do not count, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdloss import KDCELoss, ShapeError
from kdloss.functional import kd_ce_loss, soft_kl
from tests.naive.kd_ce import kd_ce


@pytest.mark.parametrize("alpha", [0.0, 0.25, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_matches_naive(alpha: float, temperature: float) -> None:
    torch.manual_seed(0)
    s = torch.randn(16, 10, dtype=torch.float64, requires_grad=True)
    t = torch.randn(16, 10, dtype=torch.float64)
    y = torch.randint(0, 10, (16,))
    out = kd_ce_loss(s, t, y, alpha=alpha, temperature=temperature)
    ref = kd_ce(s, t, y, temperature, alpha)
    torch.testing.assert_close(out, ref)
    (g,) = torch.autograd.grad(out, s)
    (gref,) = torch.autograd.grad(ref, s)
    torch.testing.assert_close(g, gref)


def test_reductions_and_ignored_rows() -> None:
    torch.manual_seed(1)
    s, t = torch.randn(2, 6, 7), torch.randn(2, 6, 7)
    y = torch.randint(0, 7, (2, 6))
    y[0, 0] = -100
    s[1, 1] = float("-inf")
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 5] = False
    rows = kd_ce_loss(s, t, y, alpha=0.5, temperature=2.0, reduction="none", mask=mask)
    assert rows.shape == (2, 6)
    assert torch.isfinite(rows).all()
    assert rows[0, 0] == 0
    assert rows[1, 1] == 0
    assert rows[1, 5] == 0
    n = 12 - 3
    torch.testing.assert_close(kd_ce_loss(s, t, y, alpha=0.5, temperature=2.0, reduction="sum", mask=mask), rows.sum())
    torch.testing.assert_close(kd_ce_loss(s, t, y, alpha=0.5, temperature=2.0, mask=mask), rows.sum() / n)
    kl = soft_kl(s, t, temperature=2.0, reduction="none", mask=mask, labels=y)
    valid = rows != 0
    ce = F.cross_entropy(s[valid], y[valid], reduction="none")
    torch.testing.assert_close(rows[valid], 0.5 * kl[valid] + 0.5 * ce)


def test_all_ignored_gives_zero_and_zero_grad() -> None:
    s = torch.randn(3, 5, requires_grad=True)
    out = kd_ce_loss(s, torch.randn(3, 5), torch.full((3,), -100))
    out.backward()
    assert out.item() == 0.0
    assert s.grad is not None
    assert torch.count_nonzero(s.grad) == 0


def test_bf16_inputs_compute_in_float32() -> None:
    s, t, y = torch.randn(4, 9), torch.randn(4, 9), torch.randint(0, 9, (4,))
    out = kd_ce_loss(s.bfloat16(), t.bfloat16(), y, alpha=0.7, temperature=2.0)
    assert out.dtype == torch.float32
    ref = kd_ce_loss(s.bfloat16().float(), t.bfloat16().float(), y, alpha=0.7, temperature=2.0)
    torch.testing.assert_close(out, ref)


def test_module_matches_function_and_repr() -> None:
    s, t, y = torch.randn(4, 9), torch.randn(4, 9), torch.randint(0, 9, (4,))
    m = KDCELoss(alpha=0.9, temperature=3.0, reduction="sum", ignore_index=1)
    assert repr(m) == "KDCELoss(alpha=0.9, temperature=3.0, reduction='sum', ignore_index=1)"
    torch.testing.assert_close(
        m(s, t, y), kd_ce_loss(s, t, y, alpha=0.9, temperature=3.0, reduction="sum", ignore_index=1)
    )


def test_compile_matches_eager() -> None:
    s, t, y = torch.randn(4, 9), torch.randn(4, 9), torch.randint(0, 9, (4,))
    fn = torch.compile(lambda a, b, c: kd_ce_loss(a, b, c, alpha=0.5, temperature=2.0), fullgraph=True)
    torch.testing.assert_close(fn(s, t, y), kd_ce_loss(s, t, y, alpha=0.5, temperature=2.0))


def test_errors() -> None:
    s, t, y = torch.randn(4, 9), torch.randn(4, 9), torch.randint(0, 9, (4,))
    with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\], got 1.5"):
        kd_ce_loss(s, t, y, alpha=1.5)
    with pytest.raises(ValueError, match="alpha must lie"):
        KDCELoss(alpha=-0.1)
    with pytest.raises(ValueError, match="reduction must be one of 'none', 'sum', 'batchmean', got 'mean'"):
        kd_ce_loss(s, t, y, reduction="mean")
    with pytest.raises(ValueError, match="reduction must be one of"):
        KDCELoss(reduction="mean")
    with pytest.raises(ValueError, match=r"temperature must be a finite number > 0, got 0\.0"):
        kd_ce_loss(s, t, y, temperature=0.0)
    with pytest.raises(TypeError, match=r"labels must be an integer tensor, got dtype torch\.float32"):
        kd_ce_loss(s, t, y.float())
    with pytest.raises(ShapeError, match=r"labels must have the logits' shape without the class dimension, \(4,\)"):
        kd_ce_loss(s, t, y[:3])
    with pytest.raises(ShapeError, match=r"class count 9 vs 8"):
        kd_ce_loss(s, t[:, :8], y)
    with pytest.raises(ShapeError, match="at least 2 dimensions"):
        kd_ce_loss(s[0], t[0], y[0])
    with pytest.raises(TypeError, match="student_logits must be a floating-point tensor"):
        kd_ce_loss(y[:, None].expand(4, 9), t, y)
    with pytest.raises(TypeError, match=r"ignore_index must be an int, got float -100\.0"):
        kd_ce_loss(s, t, y, ignore_index=-100.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        kd_ce_loss(s, t, y, mask=torch.ones(4))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 9\) or equal ignore_index=-100, got 9"):
        kd_ce_loss(s, t, torch.tensor([0, 9, 1, 2]))


def test_pure_kd_and_pure_ce_leave_the_other_term_out() -> None:
    """alpha=1 ignores the CE (a -inf label logit gives no NaN); alpha=0 ignores the KD term."""
    s, t = torch.randn(3, 6), torch.randn(3, 6)
    y = torch.tensor([0, 1, 2])
    s[0, 0] = float("-inf")  # the label's logit: CE is inf for row 0
    pure_kd = kd_ce_loss(s, t, y, alpha=1.0, temperature=2.0, reduction="none")
    torch.testing.assert_close(pure_kd, soft_kl(s, t, temperature=2.0, reduction="none"))
    s2 = torch.randn(3, 6)
    t2 = torch.randn(3, 6)
    t2[1, :] = float("-inf")  # no teacher distribution: the row does not count, even for CE
    pure_ce = kd_ce_loss(s2, t2, y, alpha=0.0, reduction="none")
    torch.testing.assert_close(pure_ce[[0, 2]], F.cross_entropy(s2[[0, 2]], y[[0, 2]], reduction="none"))
    assert pure_ce[1] == 0
