"""Composition: weighted_sum / WeightedSum totals, parts, errors, backprop."""

from __future__ import annotations

import math
import pickle
import re

import pytest
import torch

from kdloss import LossParts, ShapeError, WeightedSum, weighted_sum


def _terms(grad: bool = True) -> dict[str, torch.Tensor]:
    return {
        "kd": torch.tensor(2.0, requires_grad=grad),
        "ce": torch.tensor(1.0, requires_grad=grad),
        "hint": torch.tensor(4.0, requires_grad=grad),
    }


def test_weighted_sum_total_and_parts() -> None:
    terms = _terms()
    out = weighted_sum(terms, {"kd": 0.9, "ce": 0.1, "hint": 0.5})
    assert isinstance(out, LossParts)
    torch.testing.assert_close(out.total, torch.tensor(0.9 * 2 + 0.1 * 1 + 0.5 * 4))
    assert list(out.parts) == ["kd", "ce", "hint", "total"]
    for name in ("kd", "ce", "hint"):
        torch.testing.assert_close(out.parts[name], terms[name].detach())  # unweighted
    torch.testing.assert_close(out.parts["total"], out.total.detach())
    assert all(not p.requires_grad for p in out.parts.values())
    assert out.total.requires_grad


def test_default_weights_are_one() -> None:
    total, parts = weighted_sum(_terms(grad=False))
    torch.testing.assert_close(total, torch.tensor(7.0))
    assert set(parts) == {"kd", "ce", "hint", "total"}


def test_backprop_through_total() -> None:
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    kd, ce = (w**2).sum(), w.sum()  # d kd/dw = 2w, d ce/dw = 1
    out = weighted_sum({"kd": kd, "ce": ce}, {"kd": 0.5, "ce": 3.0})
    out.total.backward()
    torch.testing.assert_close(w.grad, 0.5 * 2 * w.detach() + 3.0)


def test_module_matches_function() -> None:
    objective = WeightedSum(kd=0.9, ce=0.1, hint=0.5)
    terms = _terms()
    a, b = objective(**terms), weighted_sum(terms, {"kd": 0.9, "ce": 0.1, "hint": 0.5})
    torch.testing.assert_close(a.total, b.total)
    assert repr(objective) == "WeightedSum(kd=0.9, ce=0.1, hint=0.5)"
    assert objective.state_dict() == {}
    clone = pickle.loads(pickle.dumps(objective))
    torch.testing.assert_close(clone(**terms).total, a.total)


def test_missing_and_extra_names() -> None:
    with pytest.raises(ValueError, match=r"missing terms \(weighted but not given\): \['hint'\], .*: \[\]"):
        weighted_sum({"kd": torch.tensor(1.0)}, {"kd": 1.0, "hint": 1.0})
    with pytest.raises(ValueError, match=r"missing terms .*: \[\], unweighted terms \(given but no weight\): \['ce'\]"):
        weighted_sum({"kd": torch.tensor(1.0), "ce": torch.tensor(1.0)}, {"kd": 1.0})
    objective = WeightedSum(kd=0.9, ce=0.1)
    with pytest.raises(ValueError, match=r"missing terms \(weighted but not given\): \['ce'\]"):
        objective(kd=torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"unweighted terms \(given but no weight\): \['hint'\]"):
        objective(kd=torch.tensor(1.0), ce=torch.tensor(1.0), hint=torch.tensor(1.0))


def test_empty_and_reserved_names() -> None:
    with pytest.raises(ValueError, match="terms must hold at least one named loss, got none"):
        weighted_sum({})
    with pytest.raises(ValueError, match="WeightedSum needs at least one named weight"):
        WeightedSum()
    with pytest.raises(ValueError, match="'total' is reserved"):
        weighted_sum({"total": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="'total' is reserved"):
        WeightedSum(total=1.0)
    with pytest.raises(ValueError, match="loss names must be non-empty strings, got ''"):
        weighted_sum({"": torch.tensor(1.0)})


@pytest.mark.parametrize("shape", [(1,), (4,), (2, 3)])
def test_non_scalar_terms(shape: tuple[int, ...]) -> None:
    expected = rf"term 'kd' must be a scalar \(0-d\) tensor: reduce it first, got shape {re.escape(str(shape))}"
    with pytest.raises(ShapeError, match=expected):
        weighted_sum({"kd": torch.ones(shape), "ce": torch.tensor(1.0)})


def test_non_tensor_terms() -> None:
    with pytest.raises(TypeError, match=r"term 'kd' must be a scalar torch\.Tensor, got float"):
        weighted_sum({"kd": 1.0})  # type: ignore[dict-item]


@pytest.mark.parametrize("weight", [math.nan, math.inf, -math.inf])
def test_non_finite_weights(weight: float) -> None:
    with pytest.raises(ValueError, match=rf"weight of 'kd' must be a finite number, got {weight}"):
        weighted_sum({"kd": torch.tensor(1.0)}, {"kd": weight})
    with pytest.raises(ValueError, match="weight of 'kd' must be a finite number"):
        WeightedSum(kd=weight)


@pytest.mark.parametrize("weight", [True, "0.5", torch.tensor(0.5), None])
def test_non_number_weights(weight: object) -> None:
    with pytest.raises(TypeError, match="weight of 'kd' must be a real number"):
        weighted_sum({"kd": torch.tensor(1.0)}, {"kd": weight})  # type: ignore[dict-item]


def test_negative_and_zero_weights_are_allowed() -> None:
    total, _ = weighted_sum({"a": torch.tensor(2.0), "b": torch.tensor(3.0)}, {"a": -1, "b": 0})
    torch.testing.assert_close(total, torch.tensor(-2.0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_different_devices() -> None:
    with pytest.raises(ValueError, match="must be on the same device"):
        weighted_sum({"kd": torch.tensor(1.0), "ce": torch.tensor(1.0, device="cuda")})
