"""The shared checks that replaced per-module copies: check_integer, check_positive_int."""

from __future__ import annotations

import pytest
import torch

from kdloss._validate import check_integer, check_positive_int


def test_check_integer() -> None:
    t = torch.tensor([1, 2])
    assert check_integer("labels", t) is t
    with pytest.raises(TypeError, match=r"labels must be an integer tensor, got dtype torch\.float32"):
        check_integer("labels", torch.zeros(2))
    with pytest.raises(TypeError, match=r"indices must be an integer tensor, got dtype torch\.bool"):
        check_integer("indices", torch.zeros(2, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"negatives must be an integer tensor, got list"):
        check_integer("negatives", [1, 2])


def test_check_positive_int() -> None:
    assert check_positive_int("n_data", 3) == 3
    assert check_positive_int("chunk_size", None, allow_none=True) is None
    with pytest.raises(ValueError, match=r"n_data must be a positive int, got 0"):
        check_positive_int("n_data", 0)
    with pytest.raises(ValueError, match=r"n_data must be a positive int, got True"):
        check_positive_int("n_data", True)
    with pytest.raises(ValueError, match=r"n_data must be a positive int, got None"):
        check_positive_int("n_data", None)
    with pytest.raises(ValueError, match=r"chunk_size must be a positive int or None, got 2\.0"):
        check_positive_int("chunk_size", 2.0, allow_none=True)  # type: ignore[arg-type]


def test_dkd_and_cohort_labels_share_the_message() -> None:
    from kdloss.functional import cohort_kd, dkd_loss

    z = torch.zeros(2, 3)
    for call in (lambda: dkd_loss(z, z, [0, 1]), lambda: cohort_kd(z, z.unsqueeze(0), [0, 1])):  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"labels must be an integer tensor, got list"):
            call()


def test_pair_up() -> None:
    from kdloss._validate import pair_up

    x = torch.zeros(2, 3)
    assert pair_up(x, x, one="tensor", many="tensors") == ([x], [x])
    assert pair_up([x, x], (x, x), one="tensor", many="tensors") == ([x, x], [x, x])
    with pytest.raises(
        ValueError, match=r"^fsp_loss: student_features and teacher_features must pair up, got 1 and 2 maps$"
    ):
        pair_up([x], [x, x], one="feature map", many="maps", context="fsp_loss: ")
    with pytest.raises(ValueError, match=r"student_features must hold at least one feature map, got an empty sequence"):
        pair_up([], [], one="feature map", many="maps")


def test_kd_ce_loss_labels_not_a_tensor() -> None:
    """A list of labels fell through to check_same_device and raised a bare AttributeError."""
    from kdloss.functional import kd_ce_loss

    z = torch.zeros(2, 3)
    with pytest.raises(TypeError, match=r"labels must be an integer tensor, got list"):
        kd_ce_loss(z, z, [0, 1])  # type: ignore[arg-type]


def test_crd_nce_loss_unset_normalizer_raises_instead_of_nan() -> None:
    """ContrastMemory's normalizers are -1 before its first training step: log(-1) gave NaN silently."""
    from kdloss.functional import crd_nce_loss

    with pytest.raises(ValueError, match=r"normalizer must be > 0, got -1\.0 \(ContrastMemory"):
        crd_nce_loss(torch.zeros(2, 5), torch.tensor(-1.0), 100)
    with pytest.raises(ValueError, match=r"normalizer must be a finite number > 0, got 0\.0"):
        crd_nce_loss(torch.zeros(2, 5), 0.0, 100)
