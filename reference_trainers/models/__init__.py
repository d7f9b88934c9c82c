"""The reference trainers' model zoo and its registry.

Every model is known by name (:data:`MODEL_NAMES`) and described by a :class:`ModelSpec`: how to
build it, which submodules are its stages (for hints, attention transfer and intermediate
heads, read with :class:`kdloss.FeatureTap`), which one gives the penultimate feature and which
is the classifier.

>>> import torch
>>> from kdloss import FeatureTap
>>> net = build_model("resnet8", num_classes=10)
>>> with FeatureTap(net, stage_paths("resnet8")) as tap:
...     logits = net(torch.randn(2, 3, 32, 32))
...     [tuple(tap[p].shape) for p in stage_paths("resnet8")]
[(2, 16, 32, 32), (2, 32, 16, 16), (2, 64, 8, 8)]

Families:

- ``resnet8 ... resnet110, resnet8x4, resnet32x4``: the community benchmark's CIFAR ResNets
  (:mod:`.cifar_resnet`); ``resnet18``, ``resnet34``: the 4-stage CIFAR ResNets of the DIH paper.
- ``wrn_16_1, wrn_16_2, wrn_28_2, wrn_40_1, wrn_40_2``: wide ResNets (:mod:`.wrn`).
- ``vgg8, vgg11, vgg13, vgg16, vgg19``: VGG with BatchNorm, CIFAR variant (:mod:`.vgg`).
- ``tv_resnet18, tv_resnet34, tv_resnet50``: torchvision's ImageNet ResNets with a new
  ``num_classes`` head (load ImageNet weights into them with :func:`load_torchvision_weights`).
- ``deepnn, lightnn``: the PyTorch KD tutorial's models (:mod:`.tutorial`, imported lazily).

Other code plugs its own models in with :func:`register_model`.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from reference_trainers.models.small import SmallCNN
from reference_trainers.models.tutorial import DeepNN, LightNN, count_parameters

__all__ = [
    "MODEL_NAMES",
    "DeepNN",
    "LightNN",
    "ModelSpec",
    "SmallCNN",
    "build_model",
    "count_parameters",
    "feature_path",
    "feature_shapes",
    "find_torchvision_weights",
    "head_paths",
    "load_torchvision_weights",
    "model_spec",
    "num_parameters",
    "register_model",
    "stage_paths",
]


@dataclass(frozen=True)
class ModelSpec:
    """How to build a model, and where its features are.

    Attributes:
        name: the registry name.
        family: ``"cifar_resnet"``, ``"wrn"``, ``"vgg"``, ``"torchvision"``, ``"tutorial"``, ...
        factory: ``factory(num_classes) -> nn.Module``.
        stage_paths: the outputs of the main stages, shallow to deep (submodule paths). These
            are the features the community benchmark distils from (its ``feat[1:-1]``: AT uses
            all of them) and where DIH mounts its intermediate heads.
        feature_path: the module whose output, flattened from dim 1, is the penultimate feature
            (the classifier's input): ``(B, C)`` for this package's models.
        classifier_path: the final linear layer.
        hint_path: the student's guided layer / teacher's hint layer of the community benchmark's
            FitNet (its ``feat[2]``, the middle stage for 3-stage models).
        stem_path: the stem's output (the benchmark's ``feat[0]``).
        head_paths: where DIH-style intermediate classifier heads mount (``None``: the stages).
        input_size: the image side the model was designed for (32 for CIFAR, 224 for ImageNet).
        reference: where the architecture comes from.
    """

    name: str
    family: str
    factory: Callable[[int], nn.Module]
    stage_paths: tuple[str, ...]
    feature_path: str
    classifier_path: str
    hint_path: str
    stem_path: str | None = None
    head_paths: tuple[str, ...] | None = None
    input_size: int = 32
    reference: str = ""


_REGISTRY: dict[str, ModelSpec] = {}
MODEL_NAMES: tuple[str, ...] = ()
"""Every registered name, in registration order (updated by :func:`register_model`)."""


def register_model(spec: ModelSpec, *, replace: bool = False) -> None:
    """Add a model to the registry (``replace=True`` to overwrite an existing name).

    Raises:
        TypeError: if ``spec`` is not a :class:`ModelSpec`.
        ValueError: if the name is taken and ``replace`` is false, or the spec has no stages.
    """
    global MODEL_NAMES
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"spec must be a ModelSpec, got {type(spec).__name__}")
    if spec.name in _REGISTRY and not replace:
        raise ValueError(f"model {spec.name!r} is already registered; pass replace=True to overwrite it")
    if not spec.stage_paths:
        raise ValueError(f"spec.stage_paths must name at least one stage, got {spec.stage_paths!r}")
    _REGISTRY[spec.name] = spec
    MODEL_NAMES = tuple(_REGISTRY)


def model_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` registered under ``name``.

    Raises:
        TypeError: if ``name`` is not a string.
        KeyError: if no model has that name; the message lists the closest names.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    spec = _REGISTRY.get(name)
    if spec is None:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=4, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise KeyError(f"unknown model {name!r}{hint} Known models: {', '.join(_REGISTRY)}")
    return spec


def build_model(name: str, num_classes: int) -> nn.Module:
    """Build the model registered as ``name`` with a ``num_classes``-way classifier.

    Args:
        name: one of :data:`MODEL_NAMES`.
        num_classes: outputs of the classifier (10 for CIFAR-10, 100 for CIFAR-100).

    Raises:
        KeyError: for an unknown name (the message lists the closest names).
        TypeError, ValueError: if ``num_classes`` is not a positive int.

    Example:
        >>> net = build_model("wrn_16_2", num_classes=100)
        >>> num_parameters(net)
        703284
    """
    spec = model_spec(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise TypeError(f"num_classes must be an int, got {type(num_classes).__name__}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return spec.factory(num_classes)


def head_paths(name: str) -> list[str]:
    """Where intermediate classifier heads mount on ``name`` (DIH: after each stage / max-pool)."""
    spec = model_spec(name)
    return list(spec.head_paths if spec.head_paths is not None else spec.stage_paths)


def stage_paths(name: str) -> list[str]:
    """The submodule paths of ``name``'s stage outputs, shallow to deep (for ``FeatureTap``)."""
    return list(model_spec(name).stage_paths)


def feature_path(name: str) -> str:
    """The submodule path whose output (flattened from dim 1) is ``name``'s penultimate feature."""
    return model_spec(name).feature_path


def num_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """The number of parameters of ``model`` (BatchNorm running statistics are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@torch.no_grad()
def feature_shapes(
    model: nn.Module, paths: Sequence[str], input_size: int | tuple[int, int] = 32, in_channels: int = 3
) -> dict[str, tuple[int, ...]]:
    """The per-sample output shape of each path for one input, e.g. to size heads and adapters.

    Runs one eval-mode forward of a zero image on the model's device and dtype, then restores
    the model's train/eval mode.

    Example:
        >>> feature_shapes(build_model("vgg8", 10), stage_paths("vgg8"))
        {'block1': (128, 16, 16), 'block2': (256, 8, 8), 'block3': (512, 4, 4), 'block4': (512, 4, 4)}
    """
    from kdloss import FeatureTap

    h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    was_training = model.training
    model.eval()
    try:
        with FeatureTap(model, list(paths), detach=True) as tap:
            model(torch.zeros(1, in_channels, h, w, device=device, dtype=dtype))
            return {p: tuple(tap[p].shape[1:]) for p in tap}
    finally:
        model.train(was_training)


# -- the zoo -----------------------------------------------------------------------------------
def _lazy(module: str, attr: str) -> Callable[[int], nn.Module]:
    def factory(num_classes: int) -> nn.Module:
        fn = getattr(importlib.import_module(module, __name__), attr)
        model: nn.Module = fn(num_classes=num_classes)
        return model

    factory.__name__ = attr
    return factory


_CRD = "CRD / RepDistiller community benchmark (Tian et al., ICLR 2020)"

_CIFAR_RESNETS = ("resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110")
for _name in (*_CIFAR_RESNETS, "resnet8x4", "resnet32x4"):
    register_model(
        ModelSpec(
            _name,
            "cifar_resnet",
            _lazy(".cifar_resnet", _name),
            ("layer1", "layer2", "layer3"),
            "flatten",
            "fc",
            "layer2",
            "relu",
            reference=_CRD,
        )
    )
for _name in ("resnet18", "resnet34"):
    register_model(
        ModelSpec(
            _name,
            "cifar_resnet",
            _lazy(".cifar_resnet", _name),
            ("layer1", "layer2", "layer3", "layer4"),
            "flatten",
            "fc",
            "layer3",
            "relu",
            reference="4-stage CIFAR ResNet of the DIH paper (Asadian et al., 2021)",
        )
    )
for _name in ("wrn_16_1", "wrn_16_2", "wrn_28_2", "wrn_40_1", "wrn_40_2"):
    register_model(
        ModelSpec(
            _name,
            "wrn",
            _lazy(".wrn", _name),
            ("block1", "block2", "block3"),
            "flatten",
            "fc",
            "block2",
            "conv1",
            reference="Zagoruyko & Komodakis, BMVC 2016; " + _CRD,
        )
    )
for _name in ("vgg8", "vgg11", "vgg13", "vgg16", "vgg19"):
    register_model(
        ModelSpec(
            _name,
            "vgg",
            _lazy(".vgg", _name),
            ("block1", "block2", "block3", "block4"),
            "flatten",
            "classifier",
            "block2",
            "block0",
            reference="Simonyan & Zisserman, ICLR 2015, BN, CIFAR variant of the " + _CRD,
        )
    )

register_model(
    ModelSpec(
        "vgg11_dih",
        "vgg",
        _lazy(".vgg", "vgg11_dih"),
        ("block1", "block2", "block3", "block4"),
        "flatten",
        "classifier",
        "block2",
        "block0",
        head_paths=("pool0", "pool1", "pool2", "pool3"),
        reference="VGG-11 (BN) of the DIH paper (Asadian et al., 2021): a max-pool after every block",
    )
)


def _torchvision(arch: str, cifar_stem: bool) -> Callable[[int], nn.Module]:
    def factory(num_classes: int) -> nn.Module:
        import torchvision

        model: nn.Module = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
        if cifar_stem:
            conv = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            model.conv1 = conv
            model.maxpool = nn.Identity()
        return model

    factory.__name__ = arch + ("_cifar" if cifar_stem else "")
    return factory


for _name, _hint in (("resnet18", "layer3.1"), ("resnet34", "layer3.5"), ("resnet50", "layer3.5")):
    for _cifar in (False, True):
        register_model(
            ModelSpec(
                f"tv_{_name}" + ("_cifar" if _cifar else ""),
                "torchvision",
                _torchvision(_name, _cifar),
                ("layer1", "layer2", "layer3", "layer4"),
                "avgpool",
                "fc",
                _hint,
                "relu" if _cifar else "maxpool",
                input_size=32 if _cifar else 224,
                reference=f"torchvision.models.{_name} (He et al., CVPR 2016)"
                + (", CIFAR stem: 3x3 stride-1 conv1, no max-pool" if _cifar else ""),
            )
        )

register_model(
    ModelSpec(
        "deepnn",
        "tutorial",
        _lazy(".tutorial", "DeepNN"),
        ("features",),
        "features",
        "classifier",
        "features",
        reference="PyTorch knowledge-distillation tutorial (teacher)",
    )
)
register_model(
    ModelSpec(
        "lightnn",
        "tutorial",
        _lazy(".tutorial", "LightNN"),
        ("features",),
        "features",
        "classifier",
        "features",
        reference="PyTorch knowledge-distillation tutorial (student)",
    )
)
del _name, _hint, _cifar


_TV_WEIGHTS = {"tv_resnet18": "ResNet18_Weights", "tv_resnet34": "ResNet34_Weights", "tv_resnet50": "ResNet50_Weights"}
_TV_WEIGHTS.update({k + "_cifar": v for k, v in _TV_WEIGHTS.items()})


def find_torchvision_weights(name: str, path: str | Path | None = None) -> Path:
    """The ImageNet weights file :func:`load_torchvision_weights` would read for ``name`` (nothing is loaded).

    ``path`` when given, else the ``IMAGENET1K_V1`` file in torchvision's cache
    (``$TORCH_HOME/hub/checkpoints``).

    Raises:
        KeyError: if ``name`` is not a ``tv_*`` model.
        FileNotFoundError: if the file does not exist; the message says where it looked and how
            to get one.
    """
    if name not in _TV_WEIGHTS:
        raise KeyError(f"ImageNet weights exist only for {', '.join(_TV_WEIGHTS)}, got {name!r}")
    if path is None:
        import torchvision

        weights = getattr(torchvision.models, _TV_WEIGHTS[name]).IMAGENET1K_V1
        filename = Path(weights.url).name
        hub_dir = Path(torch.hub.get_dir()) / "checkpoints"
        path = hub_dir / filename
        if not path.is_file():
            raise FileNotFoundError(
                f"no ImageNet weights for {name}: {path} does not exist and nothing is downloaded here. "
                f"Pass the path of a state dict, or fetch it once online with "
                f"`python -c 'import torchvision; torchvision.models.{name[3:]}(weights=\"IMAGENET1K_V1\")'`"
            )
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist (pass the path of a torchvision state dict)")
    return path


def load_torchvision_weights(model: nn.Module, name: str, path: str | Path | None = None) -> nn.Module:
    """Load ImageNet weights into a ``tv_*`` model, everything except the (resized) classifier.

    Looks in ``path`` when given (a state dict saved with ``torch.save``), else in torchvision's
    cache (``$TORCH_HOME/hub/checkpoints``) for the ``IMAGENET1K_V1`` file
    (:func:`find_torchvision_weights`). Never downloads.
    The classifier (``fc``) keeps its fresh initialisation when its shape differs from
    ImageNet's, and so does the 3x3 ``conv1`` of the ``*_cifar`` variants.

    Raises:
        KeyError: if ``name`` is not a ``tv_*`` model.
        FileNotFoundError: if no weights file is found; the message says where it looked and how
            to get one.
    """
    path = find_torchvision_weights(name, path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    own = model.state_dict()
    kept = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = [
        k
        for k in own
        if k not in kept and not k.startswith("fc.") and not (name.endswith("_cifar") and k == "conv1.weight")
    ]
    if missing:
        raise ValueError(
            f"{path} does not fit {name}: {len(missing)} tensors missing or of another shape, e.g. {missing[:3]}"
        )
    model.load_state_dict(kept, strict=False)
    return model
