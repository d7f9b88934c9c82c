"""Unusual but valid input works, bad input fails up front, and a bad value is never hidden.

Integer labels of any dtype, an empty batch, a NaN teacher, and the checks of the helpers that
used to validate nothing (``crd_update_rows``, ``fsp_matrix``).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

import kdloss
import kdloss.functional as KF
from kdloss import LossParts, ShapeError

B, C, K = 4, 5, 2


def _total(out: Tensor | LossParts) -> Tensor:
    return out.total if isinstance(out, LossParts) else out


def _inputs() -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "s": torch.randn(B, C, generator=g),
        "t": torch.randn(B, C, generator=g),
        "heads_s": torch.randn(K, B, C, generator=g),
        "heads_t": torch.randn(K, B, C, generator=g),
        "f": torch.randn(B, 3, generator=g),
    }


# every loss that takes class labels: (function, module) given the inputs and the labels
LABELLED: dict[str, tuple[Callable[..., Tensor | LossParts], Callable[..., Tensor | LossParts]]] = {
    "kd_ce_loss": (
        lambda x, y: KF.kd_ce_loss(x["s"], x["t"], y),
        lambda x, y: kdloss.KDCELoss()(x["s"], x["t"], y),
    ),
    "cohort_kd": (
        lambda x, y: KF.cohort_kd(x["s"], x["heads_t"], y),
        lambda x, y: kdloss.CohortLoss()(x["s"], x["heads_t"], y),
    ),
    "paired_head_kd": (
        lambda x, y: KF.paired_head_kd(x["heads_s"], x["heads_t"], y),
        lambda x, y: kdloss.MultiHeadKDLoss()(x["heads_s"], x["heads_t"], y),
    ),
    "tofd_loss": (
        lambda x, y: KF.tofd_loss(x["heads_s"], x["heads_t"], y, [x["f"]] * K, [2 * x["f"]] * K),
        lambda x, y: kdloss.TOFDLoss()(x["heads_s"], x["heads_t"], y, [x["f"]] * K, [2 * x["f"]] * K),
    ),
    "self_distillation_loss": (
        lambda x, y: KF.self_distillation_loss(x["heads_s"], x["s"], y),
        lambda x, y: kdloss.SelfDistillationLoss()(x["heads_s"], x["s"], y),
    ),
}


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.int8, torch.uint8])
@pytest.mark.parametrize("form", ["function", "module"])
@pytest.mark.parametrize("name", sorted(LABELLED))
def test_labels_of_any_integer_dtype_give_the_int64_result(name: str, form: str, dtype: torch.dtype) -> None:
    """int32 labels used to pass validation, then fail inside cross_entropy ('expected ... Long')."""
    fn = LABELLED[name][0 if form == "function" else 1]
    x, y = _inputs(), torch.tensor([0, 1, 4, 2])
    assert torch.equal(_total(fn(x, y.to(dtype))), _total(fn(x, y)))


@pytest.mark.parametrize("name", sorted(LABELLED))
def test_float_or_bool_labels_are_refused_up_front(name: str) -> None:
    fn = LABELLED[name][0]
    for bad in (torch.tensor([0.0, 1.0, 4.0, 2.0]), torch.tensor([True, False, True, False])):
        with pytest.raises(TypeError, match="labels must be an integer tensor"):
            fn(_inputs(), bad)


def test_self_distillation_loss_of_an_empty_batch_is_zero_not_nan() -> None:
    exits = torch.randn(K, 0, C, requires_grad=True)
    final = torch.randn(0, C, requires_grad=True)
    feats = {"exit_features": [torch.randn(0, 3)] * K, "final_feature": torch.randn(0, 3)}
    out = KF.self_distillation_loss(exits, final, torch.zeros(0, dtype=torch.long), **feats)
    assert out.total.item() == 0.0
    assert all(torch.isfinite(v) for v in out.parts.values()), out.parts
    out.total.backward()
    assert final.grad is not None
    assert exits.grad is not None


@pytest.mark.parametrize("side", ["teacher", "student"])
@pytest.mark.parametrize("include_self", [True, False])
def test_pkt_loss_does_not_hide_a_nan_embedding(side: str, include_self: bool) -> None:
    """A NaN teacher used to give a loss of exactly 0 with a zero gradient."""
    g = torch.Generator().manual_seed(1)
    s = torch.randn(5, 4, generator=g, requires_grad=True)
    t = torch.randn(5, 4, generator=g)
    bad_s, bad_t = (s.detach().clone(), t.clone())
    (bad_t if side == "teacher" else bad_s)[2, 1] = float("nan")
    leaf = bad_s.requires_grad_()
    loss = KF.pkt_loss(leaf, bad_t, include_self=include_self)
    assert torch.isnan(loss)
    loss.backward()
    assert leaf.grad is not None
    assert torch.isnan(leaf.grad).any()
    clean = KF.pkt_loss(s, t, include_self=include_self)  # and clean input is untouched by the change
    assert torch.isfinite(clean)
    assert clean.item() > 0


_BANK, _IDX, _EMB = torch.randn(5, 3), torch.tensor([0, 4]), torch.randn(2, 3)


@pytest.mark.parametrize(
    ("exc", "match", "call"),
    [
        (ValueError, r"indices must lie in \[0, n_data=5\), got values in \[0, 7\]",
         lambda: KF.crd_update_rows(_BANK, torch.tensor([0, 7]), _EMB)),
        (ShapeError, r"embeddings must have shape \(B, feat_dim\) = \(2, 3\), got \(2, 4\)",
         lambda: KF.crd_update_rows(_BANK, _IDX, torch.randn(2, 4))),
        (TypeError, "indices must be an integer tensor", lambda: KF.crd_update_rows(_BANK, _IDX.float(), _EMB)),
        (TypeError, "bank must be a floating-point tensor", lambda: KF.crd_update_rows(_BANK.long(), _IDX, _EMB)),
        (ShapeError, "indices must have 1 dimensions", lambda: KF.crd_update_rows(_BANK, _IDX.view(2, 1), _EMB)),
        (ValueError, r"momentum must lie in \[0, 1\], got 1.5",
         lambda: KF.crd_update_rows(_BANK, _IDX, _EMB, momentum=1.5)),
        (ShapeError, "bank must have 2 dimensions", lambda: KF.crd_update_rows(_BANK[0], _IDX, _EMB)),
    ],
    ids=["index-range", "width", "float-indices", "int-bank", "2d-indices", "momentum", "1d-bank"],
)  # fmt: skip
def test_crd_update_rows_validates_its_inputs(exc: type[Exception], match: str, call: Callable[[], Tensor]) -> None:
    """It used to fail with a bare IndexError deep inside (or not at all)."""
    with pytest.raises(exc, match=match):
        call()


def test_crd_update_rows_without_validate_skips_only_the_range_check() -> None:
    assert KF.crd_update_rows(_BANK, _IDX, _EMB, validate=False).shape == (2, 3)  # no host read
    with pytest.raises(ShapeError):
        KF.crd_update_rows(_BANK, _IDX, torch.randn(2, 4), validate=False)


_MAP = torch.randn(2, 3, 4, 4)


@pytest.mark.parametrize(
    ("exc", "match", "call"),
    [
        (ShapeError, r"same batch size .* \(2, 3, 4, 4\) and \(3, 3, 4, 4\)",
         lambda: KF.fsp_matrix(_MAP, torch.randn(3, 3, 4, 4))),
        (ShapeError, r"second must be a \(B, C, H, W\) feature map, got shape \(2, 48\)",
         lambda: KF.fsp_matrix(_MAP, _MAP.flatten(1))),
        (TypeError, "first must be a floating-point tensor", lambda: KF.fsp_matrix(_MAP.long(), _MAP)),
        (TypeError, "second must be a torch.Tensor", lambda: KF.fsp_matrix(_MAP, [1.0])),  # type: ignore[arg-type]
    ],
    ids=["batch", "ndim", "integer", "not-a-tensor"],
)  # fmt: skip
def test_fsp_matrix_validates_its_inputs(exc: type[Exception], match: str, call: Callable[[], Tensor]) -> None:
    """It used to fail with a bare broadcasting error, or compute on integer maps."""
    with pytest.raises(exc, match=match):
        call()
