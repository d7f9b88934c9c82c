"""The reference trainers' model zoo: exact sizes, shapes, stage paths, registry errors."""

from __future__ import annotations

import doctest
import importlib
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from kdloss import FeatureTap
from reference_trainers import models
from reference_trainers.models import (
    MODEL_NAMES,
    ModelSpec,
    build_model,
    feature_path,
    feature_shapes,
    head_paths,
    load_torchvision_weights,
    model_spec,
    num_parameters,
    register_model,
    stage_paths,
)
from reference_trainers.models.cifar_resnet import CifarResNet
from reference_trainers.models.vgg import VGG, VGG_CONFIGS
from reference_trainers.models.wrn import WideResNet

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one torch thread (tests/conftest.py)

# Exact parameter counts with a 100-way classifier. The CIFAR ResNets, WRNs and VGGs were also
# checked against the community benchmark's own code (CRD / RepDistiller): identical state-dict
# keys and shapes, identical eval-mode outputs after loading its weights.
PARAMS_100 = {
    "resnet8": 83_892,
    "resnet14": 181_108,
    "resnet20": 278_324,
    "resnet32": 472_756,
    "resnet44": 667_188,
    "resnet56": 861_620,
    "resnet110": 1_736_564,
    "resnet8x4": 1_233_540,
    "resnet32x4": 7_433_860,
    "resnet18": 11_220_132,
    "resnet34": 21_328_292,
    "wrn_16_1": 180_916,
    "wrn_16_2": 703_284,
    "wrn_28_2": 1_479_220,
    "wrn_40_1": 569_780,
    "wrn_40_2": 2_255_156,
    "vgg8": 3_965_028,
    "vgg11": 9_277_284,
    "vgg11_dih": 9_277_284,
    "vgg13": 9_462_180,
    "vgg16": 14_774_436,
    "vgg19": 20_086_692,
    "tv_resnet18": 11_227_812,
    "tv_resnet34": 21_335_972,
    "tv_resnet50": 23_712_932,
    "tv_resnet18_cifar": 11_220_132,
    "tv_resnet34_cifar": 21_328_292,
    "tv_resnet50_cifar": 23_705_252,
}

# What the community benchmark's papers print (CIFAR-100), in millions: they are the exact counts
# truncated (not rounded) to two decimals (resnet110: 1.7366M -> 1.73, wrn_40_2: 2.2552M -> 2.25).
PUBLISHED_M = {"resnet110": 1.73, "resnet8x4": 1.23, "resnet32x4": 7.43, "wrn_40_2": 2.25, "vgg13": 9.46}

OWN = [n for n in MODEL_NAMES if model_spec(n).family != "tutorial"]


def _has_tutorial() -> bool:
    try:
        importlib.import_module("reference_trainers.models.tutorial")
    except ModuleNotFoundError:
        return False
    return True


def test_registry_lists_every_family() -> None:
    assert set(PARAMS_100) == set(OWN)
    assert {"deepnn", "lightnn"} <= set(MODEL_NAMES)


@pytest.mark.parametrize("name", OWN)
def test_exact_parameter_count(name: str) -> None:
    assert num_parameters(build_model(name, 100)) == PARAMS_100[name]


@pytest.mark.parametrize("name", sorted(PUBLISHED_M))
def test_counts_match_the_benchmark_tables(name: str) -> None:
    assert math.floor(PARAMS_100[name] / 1e4) / 100 == pytest.approx(PUBLISHED_M[name])


def test_dih_resnets_and_cifar10_heads() -> None:
    # The 4-stage CIFAR ResNet-18/34 are 11.17M / 21.28M with 10 classes, as widely reported.
    assert num_parameters(build_model("resnet18", 10)) == 11_173_962
    assert num_parameters(build_model("resnet34", 10)) == 21_282_122
    # The classifier is the only part that depends on num_classes.
    for name in ("resnet8x4", "wrn_40_2", "vgg13"):
        fc = build_model(name, 10).get_submodule(model_spec(name).classifier_path)
        assert isinstance(fc, nn.Linear)
        assert PARAMS_100[name] - num_parameters(build_model(name, 10)) == 90 * (fc.in_features + 1)


@pytest.mark.parametrize("name", OWN)
def test_output_stages_and_feature_with_feature_tap(name: str) -> None:
    spec = model_spec(name)
    size = min(spec.input_size, 64)
    net = build_model(name, 7)
    x = torch.randn(2, 3, size, size)
    paths = [*stage_paths(name), spec.hint_path, feature_path(name)]
    with FeatureTap(net, paths) as tap:
        out = net(x)
        feats = [tap[p] for p in stage_paths(name)]  # raises if a later module overwrote one in place
        pen = tap[feature_path(name)].flatten(1)
        hint = tap[spec.hint_path]
    assert out.shape == (2, 7)
    assert spec.hint_path in spec.stage_paths or spec.family == "torchvision"
    # Stages go from shallow to deep: resolution never grows, and the last one feeds the classifier.
    sides = [f.shape[-1] for f in feats]
    assert sides == sorted(sides, reverse=True)
    assert all(f.shape[0] == 2 and f.dim() == 4 for f in [*feats, hint])
    classifier = net.get_submodule(spec.classifier_path)
    assert isinstance(classifier, nn.Linear)
    assert pen.shape == (2, classifier.in_features)
    assert torch.allclose(classifier(pen), out, atol=1e-5)
    # Student side: the tapped stage features carry the graph back to the stem.
    feats[0].square().mean().backward()  # type: ignore[no-untyped-call]
    assert next(net.parameters()).grad is not None


def test_feature_shapes_of_the_benchmark_pairs() -> None:
    shapes = {n: feature_shapes(build_model(n, 100), stage_paths(n)) for n in ("resnet8x4", "resnet32x4", "wrn_40_2")}
    assert (
        shapes["resnet8x4"]
        == shapes["resnet32x4"]
        == {
            "layer1": (64, 32, 32),
            "layer2": (128, 16, 16),
            "layer3": (256, 8, 8),
        }
    )
    assert shapes["wrn_40_2"] == {"block1": (32, 32, 32), "block2": (64, 16, 16), "block3": (128, 8, 8)}
    # Section 2's hint pair: teacher layer3[5] and student layer3[1] at stride 16 (14x14 at 224 px).
    net = build_model("tv_resnet50", 10)
    assert feature_shapes(net, ["layer3.5"], 64) == {"layer3.5": (1024, 4, 4)}
    assert feature_shapes(build_model("tv_resnet18", 10), ["layer3.1"], 64) == {"layer3.1": (256, 4, 4)}
    net.train()
    feature_shapes(net, ["layer1"], 32)
    assert net.training  # the mode is restored


def test_head_paths() -> None:
    assert head_paths("resnet110") == ["layer1", "layer2", "layer3"]  # DIH: k = 3
    assert head_paths("resnet18") == ["layer1", "layer2", "layer3", "layer4"]  # k = 4
    assert head_paths("wrn_28_2") == ["block1", "block2", "block3"]  # k = 3
    assert head_paths("vgg11_dih") == ["pool0", "pool1", "pool2", "pool3"]  # k = 4, after each max-pool
    assert feature_shapes(build_model("vgg11_dih", 10), [*head_paths("vgg11_dih"), "flatten"]) == {
        "pool0": (64, 16, 16),
        "pool1": (128, 8, 8),
        "pool2": (256, 4, 4),
        "pool3": (512, 2, 2),
        "flatten": (512,),
    }


def test_vgg_geometry_and_preact() -> None:
    net = build_model("vgg13", 100)
    assert isinstance(net, VGG)
    assert net.preact_paths == ["block1.4", "block2.4", "block3.4", "block4.4"]
    assert all(isinstance(net.get_submodule(p), nn.BatchNorm2d) for p in net.preact_paths)
    net.eval()
    with FeatureTap(net, ["block2", "block2.4"]) as tap:
        net(torch.randn(2, 3, 32, 32))
        post, pre = tap["block2"], tap["block2.4"]  # pre would raise if the ReLU were in place
    assert pre.min() < 0 <= post.min()
    torch.testing.assert_close(post, pre.relu())
    # pool3 only for 64x64 inputs, as in the benchmark: block4 runs at 4x4 either way.
    assert feature_shapes(net, ["block3", "block4"], 64) == {"block3": (512, 8, 8), "block4": (512, 4, 4)}


def test_state_dict_keys_follow_the_benchmark() -> None:
    keys = {n: set(build_model(n, 100).state_dict()) for n in ("resnet8x4", "resnet8", "wrn_40_2", "vgg13")}
    assert "layer1.0.downsample.0.weight" in keys["resnet8x4"]  # 32-channel stem -> 64-channel stage
    assert "layer1.0.downsample.0.weight" not in keys["resnet8"]
    assert {"layer2.0.downsample.1.running_var", "fc.weight"} <= keys["resnet8"]
    assert {"block2.layer.0.convShortcut.weight", "block1.layer.5.bn2.weight", "bn1.weight"} <= keys["wrn_40_2"]
    assert {"block1.3.weight", "block1.4.running_mean", "classifier.bias"} <= keys["vgg13"]


def test_wrn_and_resnet_depths() -> None:
    assert [len(getattr(build_model("resnet110", 10), f"layer{i}")) for i in (1, 2, 3)] == [18, 18, 18]
    assert len(list(build_model("wrn_28_2", 10).get_submodule("block3.layer").children())) == 4
    with pytest.raises(ValueError, match=r"depth must be 6n \+ 4 .* got 18"):
        WideResNet(18, 2, 10)
    with pytest.raises(ValueError, match="drop_rate must be in"):
        WideResNet(16, 2, 10, drop_rate=1.0)
    with pytest.raises(ValueError, match="widths must list the stem's width and one per stage"):
        CifarResNet((1, 1, 1), (16, 32, 64), 10)
    with pytest.raises(ValueError, match="config must list 5 non-empty blocks"):
        VGG(VGG_CONFIGS["vgg8"][:4], 10)


def test_registry_errors() -> None:
    with pytest.raises(KeyError, match=r"unknown model 'resnet8x8'; did you mean resnet8x4"):
        build_model("resnet8x8", 10)
    with pytest.raises(ValueError, match="num_classes must be >= 1, got 0"):
        build_model("resnet8", 0)
    with pytest.raises(TypeError, match="num_classes must be an int, got str"):
        build_model("resnet8", "10")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="num_classes must be an int, got bool"):
        build_model("resnet8", True)
    with pytest.raises(ValueError, match="'resnet8' is already registered"):
        register_model(model_spec("resnet8"))
    with pytest.raises(TypeError, match="spec must be a ModelSpec"):
        register_model("resnet8")  # type: ignore[arg-type]


def test_register_a_new_model() -> None:
    def factory(k: int) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(12, k))

    spec = ModelSpec("tiny_test_net", "test", factory, ("1",), "0", "1", "1")
    register_model(spec)
    try:
        assert "tiny_test_net" in models.MODEL_NAMES
        assert build_model("tiny_test_net", 3)(torch.randn(1, 3, 2, 2)).shape == (1, 3)
    finally:
        models._REGISTRY.pop("tiny_test_net")
        models.MODEL_NAMES = tuple(models._REGISTRY)


def test_tutorial_models_are_lazy() -> None:
    if not _has_tutorial():
        with pytest.raises(ModuleNotFoundError, match="tutorial"):
            build_model("deepnn", 10)
        return
    # PyTorch's Knowledge Distillation Tutorial prints DeepNN 1,186,986 and LightNN 267,738 parameters.
    assert num_parameters(build_model("deepnn", 10)) == 1_186_986
    assert num_parameters(build_model("lightnn", 10)) == 267_738
    for name, shape in (("deepnn", (32, 8, 8)), ("lightnn", (16, 8, 8))):
        assert feature_shapes(build_model(name, 10), stage_paths(name)) == {"features": shape}


def test_torchvision_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    student = build_model("tv_resnet18", 10)
    with pytest.raises(FileNotFoundError, match=r"no ImageNet weights for tv_resnet18: .*resnet18-f37072fd\.pth"):
        load_torchvision_weights(student, "tv_resnet18")
    with pytest.raises(KeyError, match="ImageNet weights exist only for"):
        load_torchvision_weights(student, "resnet18")
    imagenet = build_model("tv_resnet18", 1000)
    path = tmp_path / "r18.pth"
    torch.save(imagenet.state_dict(), path)
    fc_before = student.get_parameter("fc.weight").clone()
    load_torchvision_weights(student, "tv_resnet18", path)
    key = "layer3.1.conv2.weight"
    torch.testing.assert_close(student.get_parameter(key), imagenet.get_parameter(key))
    torch.testing.assert_close(student.get_parameter("fc.weight"), fc_before)
    cifar = load_torchvision_weights(build_model("tv_resnet18_cifar", 10), "tv_resnet18_cifar", path)
    torch.testing.assert_close(cifar.get_parameter(key), imagenet.get_parameter(key))
    assert cifar.get_parameter("conv1.weight").shape == (64, 3, 3, 3)  # the CIFAR stem stays fresh
    torch.save(build_model("resnet18", 10).state_dict(), path)
    with pytest.raises(ValueError, match="does not fit tv_resnet18"):
        load_torchvision_weights(student, "tv_resnet18", path)
    with pytest.raises(FileNotFoundError, match=r"weights file .*nope\.pth does not exist"):
        load_torchvision_weights(student, "tv_resnet18", tmp_path / "nope.pth")


@pytest.mark.parametrize("module", ["__init__", "cifar_resnet", "wrn", "vgg"])
def test_docstring_examples(module: str) -> None:
    # reference_trainers is outside pytest's doctest paths: run its examples here.
    name = "reference_trainers.models" + ("" if module == "__init__" else f".{module}")
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0
