"""Tests of kdloss._validate: the shared checks, the error type and the reducer."""

from __future__ import annotations

from typing import get_args

import pytest
import torch

from kdloss import Reduction, ShapeError
from kdloss._validate import (
    check_batch,
    check_float,
    check_int,
    check_ndim,
    check_nonnegative,
    check_positive,
    check_reduction,
    check_same_device,
    check_same_shape,
    check_tensor,
    check_unit_interval,
    reduce_loss,
)
from tests.helpers import REDUCTIONS


def test_reduction_literal_and_error_type() -> None:
    assert get_args(Reduction) == REDUCTIONS
    assert issubclass(ShapeError, ValueError)
    for r in REDUCTIONS:
        assert check_reduction(r) == r


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        ("avg", ValueError, r"reduction must be one of 'none', 'mean', 'batchmean', 'sum', got 'avg'"),
        ("Mean", ValueError, r"got 'Mean'"),
        (None, ValueError, r"got None"),
        ("", ValueError, r"got ''"),
    ],
)
def test_check_reduction_errors(value: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        check_reduction(value)  # type: ignore[arg-type]


def test_check_reduction_restricted() -> None:
    assert check_reduction("sum", ("sum", "mean")) == "sum"
    with pytest.raises(ValueError, match=r"reduction must be one of 'sum', 'mean', got 'none'"):
        check_reduction("none", ("sum", "mean"))


def test_check_positive() -> None:
    assert check_positive("temperature", 4) == 4.0
    assert isinstance(check_positive("t", 4), float)
    assert check_positive("temperature", 1e-6) == 1e-6
    for bad in (0, 0.0, -1, float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match=rf"temperature must be a finite number > 0, got {bad!r}"):
            check_positive("temperature", bad)
    for bad in (True, "2", None, torch.tensor(2.0), [2.0]):
        with pytest.raises(TypeError, match=rf"temperature must be a positive number, got {type(bad).__name__} "):
            check_positive("temperature", bad)  # type: ignore[arg-type]


def test_check_nonnegative() -> None:
    assert check_nonnegative("beta", 0) == 0.0
    assert isinstance(check_nonnegative("beta", 3), float)
    assert check_nonnegative("beta", 1000.0) == 1000.0
    for bad in (-1e-9, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=rf"beta must be a finite number >= 0, got {bad!r}"):
            check_nonnegative("beta", bad)
    for bad in (False, "1", None):
        with pytest.raises(TypeError, match=rf"beta must be a number >= 0, got {type(bad).__name__} "):
            check_nonnegative("beta", bad)  # type: ignore[arg-type]


def test_check_int() -> None:
    assert check_int("ignore_index", -100) == -100
    for bad in (True, 1.0, None, torch.tensor(1)):
        with pytest.raises(TypeError, match=rf"ignore_index must be an int, got {type(bad).__name__} "):
            check_int("ignore_index", bad)  # type: ignore[arg-type]


def test_check_unit_interval() -> None:
    assert check_unit_interval("beta", 0) == 0.0
    assert check_unit_interval("beta", 1) == 1.0
    assert check_unit_interval("beta", 0.5, open_ends=True) == 0.5
    for bad in (0.0, 1.0):
        with pytest.raises(ValueError, match=rf"beta must lie in \(0, 1\), got {bad!r}"):
            check_unit_interval("beta", bad, open_ends=True)
    for bad in (-0.1, 1.1, float("nan")):
        with pytest.raises(ValueError, match=rf"beta must lie in \[0, 1\], got {bad!r}"):
            check_unit_interval("beta", bad)
    with pytest.raises(TypeError, match=r"beta must be a number in \[0, 1\], got bool False"):
        check_unit_interval("beta", False)


def test_check_tensor_and_float() -> None:
    x = torch.zeros(2)
    assert check_tensor("x", x) is x
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        y = x.to(dtype)
        assert check_float("x", y) is y
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor, got ndarray"):
        check_tensor("x", x.numpy())
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor, got list"):
        check_float("x", [1.0])  # type: ignore[arg-type]
    for dtype in (torch.int64, torch.int8, torch.uint8, torch.bool, torch.complex64):
        with pytest.raises(
            TypeError,
            match=rf"x must be a floating-point tensor \(float32, float64, bfloat16 or float16\), got dtype {dtype}",
        ):
            check_float("x", x.to(dtype))


def test_check_ndim() -> None:
    x = torch.zeros(2, 3)
    assert check_ndim("x", x, (2, 3)) is x
    with pytest.raises(ShapeError, match=r"x must have 4 dimensions, got shape \(2, 3\)"):
        check_ndim("x", x, (4,))
    with pytest.raises(ShapeError, match=r"x must have 3 or 4 dimensions \(B, C, H, W\), got shape \(2, 3\)"):
        check_ndim("x", x, (3, 4), "(B, C, H, W)")


def test_check_same_device() -> None:
    a, b = torch.zeros(1), torch.zeros(1)
    check_same_device(a=a, b=b, c=torch.zeros(2))
    check_same_device(only=a)
    with pytest.raises(ValueError, match=r"a and m must be on the same device, got cpu and meta"):
        check_same_device(a=a, b=b, m=torch.zeros(1, device="meta"))


def test_check_same_shape() -> None:
    a = torch.zeros(4, 5)
    check_same_shape("a", a, "b", torch.ones(4, 5))
    cases = [
        (torch.zeros(3, 5), r"a and b must have the same shape, got \(4, 5\) and \(3, 5\) \(batch size 4 vs 3\)$"),
        (torch.zeros(4, 6), r"got \(4, 5\) and \(4, 6\) \(class count 5 vs 6\)$"),
        (torch.zeros(5), r"got \(4, 5\) and \(5,\)$"),
        (torch.zeros(3, 6), r"got \(4, 5\) and \(3, 6\) \(batch size 4 vs 3\)$"),
    ]
    for b, match in cases:
        with pytest.raises(ShapeError, match=match):
            check_same_shape("a", a, "b", b)
    # a middle dimension: no batch/class detail
    with pytest.raises(ShapeError, match=r"got \(2, 3, 5\) and \(2, 4, 5\)$"):
        check_same_shape("a", torch.zeros(2, 3, 5), "b", torch.zeros(2, 4, 5))
    with pytest.raises(ShapeError, match=r"got \(4, 5\) and \(4, 6\) \(class count 5 vs 6\); use an adapter$"):
        check_same_shape("a", a, "b", torch.zeros(4, 6), hint="use an adapter")


def test_check_batch() -> None:
    check_batch("a", torch.zeros(3, 2), "b", torch.zeros(3, 7, 7))
    with pytest.raises(
        ShapeError, match=r"a and b must have the same batch size \(first dimension\), got shapes \(3, 2\) and \(2, 2\)"
    ):
        check_batch("a", torch.zeros(3, 2), "b", torch.zeros(2, 2))
    with pytest.raises(ShapeError, match=r"got shapes \(\) and \(2,\)"):
        check_batch("a", torch.tensor(1.0), "b", torch.zeros(2))


def test_reduce_loss() -> None:
    loss = torch.tensor([1.0, 2.0, 3.0, 6.0])
    assert torch.equal(reduce_loss(loss, "none", rows=4), loss)
    assert reduce_loss(loss, "sum", rows=4) == 12.0
    assert reduce_loss(loss, "batchmean", rows=4) == 3.0
    assert reduce_loss(loss, "mean", rows=4, elements_per_row=3) == 1.0
    # a tensor count (a mask decides it): no host sync, same numbers
    assert reduce_loss(loss, "batchmean", rows=torch.tensor(3)) == 4.0
    assert reduce_loss(loss, "mean", rows=torch.tensor(2), elements_per_row=2) == 3.0
    # an empty count gives 0, never NaN, for int and tensor counts
    empty = torch.zeros(0)
    for rows in (0, torch.tensor(0)):
        for r in ("sum", "batchmean", "mean"):
            out = reduce_loss(empty, r, rows=rows, elements_per_row=5)  # type: ignore[arg-type]
            assert out.item() == 0.0
            assert not torch.isnan(out)
    # the result keeps the loss's dtype with a tensor count
    assert reduce_loss(loss.double(), "batchmean", rows=torch.tensor(3)).dtype == torch.float64
