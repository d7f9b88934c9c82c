"""The PyTorch KD tutorial's models: exact parameter counts (as the tutorial prints them) and feature shapes."""

from __future__ import annotations

import torch

from reference_trainers.models import DeepNN, LightNN, count_parameters


def test_parameter_counts_match_the_tutorial() -> None:
    assert count_parameters(DeepNN()) == 1_186_986
    assert count_parameters(LightNN()) == 267_738


def test_feature_and_logit_shapes() -> None:
    x = torch.zeros(2, 3, 32, 32)
    deep, light = DeepNN(), LightNN()
    assert deep.features(x).shape == (2, 32, 8, 8)
    assert light.features(x).shape == (2, 16, 8, 8)
    assert deep(x).shape == light(x).shape == (2, 10)


def test_widths_and_image_size_scale_the_classifier() -> None:
    m = DeepNN(num_classes=5, widths=(8, 8, 8, 4), image_size=16)
    assert m(torch.zeros(1, 3, 16, 16)).shape == (1, 5)
    assert m.classifier[0].in_features == 4 * 4 * 4


def test_small_cnn_stages() -> None:
    from reference_trainers.models import SmallCNN

    m = SmallCNN()
    x = torch.zeros(2, 3, 32, 32)
    assert m.stage1(x).shape == (2, 32, 16, 16)
    assert m.stage2(m.stage1(x)).shape == (2, 64, 8, 8)
    assert m(x).shape == (2, 10)
    assert count_parameters(m) == 131_754
