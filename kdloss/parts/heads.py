"""Intermediate classifier heads mounted on any model by module path (DIH, MHKD, TOFD, self-distillation).

:class:`IntermediateHeads` owns the heads (trainable submodules) and only *refers* to the model
it reads from: the model is not edited, not registered as a submodule (so ``heads.parameters()``,
``heads.state_dict()`` and ``heads.to(...)`` cover the heads only) and is read through a
:class:`kdloss.FeatureTap` whose hooks live only for the duration of each forward.

:func:`finetune_heads` trains the heads with cross-entropy while the backbone stays frozen, and
proves it: every backbone parameter and buffer is compared bit for bit before and after.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence
from typing import Any, Literal, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdloss.parts.adapters import check_optimizer
from kdloss.tap import FeatureTap, unwrap_model

__all__ = [
    "ClassifierHead",
    "FinetuneResult",
    "HeadType",
    "HeadsOutput",
    "IntermediateHeads",
    "evaluate_heads",
    "finetune_heads",
]

HeadType = Literal["dih", "gap", "mhkd", "tofd"]
"""The head architectures of :class:`IntermediateHeads`:

- ``"dih"``: the DIH authors' head, the stage output flattened, then one ``Linear`` to the classes;
- ``"gap"``: a lighter head, global average pooling, then one ``Linear``;
- ``"mhkd"``: MHKD's head, two conv3x3-BN-ReLU blocks, global average pooling, ``Linear``-ReLU,
  ``Linear``;
- ``"tofd"``: TOFD's task-oriented deep head, the rest of the backbone's stages re-instantiated
  (deep copies with fresh weights) for that depth, global average pooling, ``Linear``.
"""

_HEAD_TYPES: tuple[str, ...] = ("dih", "gap", "mhkd", "tofd")


class HeadsOutput(NamedTuple):
    """What :class:`IntermediateHeads` returns for one batch.

    Attributes:
        logits: the model's own output (its final classifier), ``(B, C)``.
        head_logits: one ``(B, C)`` tensor per head, in path order.
        head_features: each head's penultimate feature, ``(B, D_i)`` (what its last ``Linear`` reads).
        final_feature: the flattened output of ``feature_path`` (``None`` without one).

    Example:
        >>> import torch
        >>> out = HeadsOutput(torch.zeros(2, 10), [torch.ones(2, 10)], [torch.zeros(2, 4)], None)
        >>> out.cohort().shape  # the head, then the final classifier
        torch.Size([2, 2, 10])
    """

    logits: Tensor
    head_logits: list[Tensor]
    head_features: list[Tensor]
    final_feature: Tensor | None

    def cohort(self) -> Tensor:
        """The ``k + 1`` teachers' logits stacked as ``(k + 1, B, C)``: the heads, then the final classifier."""
        return torch.stack([*self.head_logits, self.logits])


class ClassifierHead(nn.Module):
    """A classifier head: ``body`` maps a stage output to a ``(B, D)`` feature, ``fc`` to the logits.

    :class:`IntermediateHeads` builds these; build one by hand only to mount a head of your own.

    Args:
        body: maps a stage's output to a flat ``(B, D)`` feature (pooling, convolutions, ...).
        fc: the ``nn.Linear(D, C)`` classifier on that feature.
        kind: a label shown in ``repr`` (``"dih"``, ``"mhkd"``, ``"tofd"`` for the built-in kinds).

    Example:
        >>> import torch
        >>> head = ClassifierHead(torch.nn.Flatten(1), torch.nn.Linear(12, 10), kind="dih")
        >>> head(torch.zeros(2, 3, 2, 2)).shape
        torch.Size([2, 10])
    """

    def __init__(self, body: nn.Module, fc: nn.Linear, *, kind: str) -> None:
        super().__init__()
        self.body = body
        self.fc = fc
        self.kind = kind

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(feature, logits)``."""
        feature: Tensor = self.body(x)
        logits: Tensor = self.fc(feature)
        return feature, logits

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x)[1]

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"


class _PoolFlatten(nn.Module):
    """Global average pooling of a ``(B, C, *spatial)`` map, or flattening of anything else."""

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim > 2:
            return x.flatten(2).mean(dim=2)
        return x


def _fresh_copy(module: nn.Module) -> nn.Module:
    """A deep copy with re-initialised weights, reset BatchNorm statistics, no hooks, trainable.

    Parameters owned by a submodule that has ``reset_parameters`` are not copied (an empty tensor
    of the same shape takes their place and ``reset_parameters`` fills it); any other parameter or
    buffer is copied as is.
    """
    memo: dict[int, Any] = {}
    for sub in module.modules():
        if callable(getattr(sub, "reset_parameters", None)):
            for p in sub.parameters(recurse=False):
                memo[id(p)] = nn.Parameter(torch.empty_like(p), requires_grad=True)
    clone = copy.deepcopy(module, memo)
    for sub in clone.modules():
        for hooks in (sub._forward_hooks, sub._forward_pre_hooks, sub._backward_hooks):
            hooks.clear()
        reset = getattr(sub, "reset_parameters", None)
        if callable(reset):
            reset()
    clone.requires_grad_(True)
    clone.train()
    return clone


def _build_body(
    kind: str,
    feature: Tensor,
    *,
    rest: Sequence[tuple[str, nn.Module]],
    hidden: int | None,
) -> nn.Module:
    if kind == "dih":
        return nn.Flatten(1)
    if kind == "gap":
        return _PoolFlatten()
    if kind == "mhkd":
        c = feature.shape[1]
        width = hidden if hidden is not None else c
        return nn.Sequential(
            nn.Conv2d(c, c, 3, padding=1, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(),
            nn.Conv2d(c, c, 3, padding=1, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(),
            _PoolFlatten(),
            nn.Linear(c, width),
            nn.ReLU(),
        )
    return nn.Sequential(*(_fresh_copy(m) for _, m in rest), _PoolFlatten())


def _eval_mode(module: nn.Module) -> dict[nn.Module, bool]:
    """Put ``module`` in eval mode and return every submodule's previous mode."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    return modes


def _restore_modes(modes: dict[nn.Module, bool]) -> None:
    for m, mode in modes.items():
        m.training = mode


class IntermediateHeads(nn.Module):
    """Classifier heads mounted on a model's intermediate stages by module path, the model unchanged.

    The input size of every head is inferred from one forward of ``example_input`` through the
    model (run under ``torch.no_grad()`` with the model temporarily in eval mode, so that no
    BatchNorm statistic moves). Calling the module runs the model with a
    :class:`kdloss.FeatureTap` on the paths and returns a :class:`HeadsOutput`: the model's own
    logits, each head's logits and penultimate feature. Head types: see :data:`HeadType`.

    Two uses:

    - **DIH / MHKD / TOFD teacher cohorts** (``detach=True``, the default): the backbone runs
      under ``torch.no_grad()`` and in eval mode (restored afterwards, so BatchNorm statistics
      never move whatever mode the model was left in), and the heads read detached features; fine-tune the heads with
      :func:`finetune_heads`, then ``output.cohort()`` is the ``(k + 1, B, C)`` input of
      :func:`kdloss.functional.cohort_kd`.
    - **Self-distillation / student heads** (``detach=False``): the backbone runs with autograd,
      and the heads' losses reach the backbone's weights (early exits of one network).

    The model is referenced, not registered: ``heads.parameters()``, ``state_dict()``,
    ``.to()`` and ``.train()`` concern the heads only. Move the model yourself.

    DIH mounts one head after every group of residual blocks (``layer1`` .. ``layer4`` of a
    torchvision ResNet: ``k = 4``; ``layer1`` .. ``layer3`` of a CIFAR ResNet: ``k = 3``).

    Args:
        model: the backbone (any ``nn.Module`` returning ``(B, C)`` logits; DDP/compile wrappers
            and :class:`kdloss.FrozenTeacher` are unwrapped, so paths are those of the bare model).
        paths: module paths of the stages to mount heads on, or :class:`kdloss.FeatureTap` glob
            patterns (``"layer*"`` is ``layer1`` .. ``layer4``: ``*`` stays within one dotted
            part); one head per resolved path, in the order given.
        num_classes: the classes ``C`` the heads predict; must equal the model's output size.
        example_input: one example batch (a tensor, or a tuple of positional arguments) on the
            model's device; two samples are enough.
        head: a :data:`HeadType`.
        stages: for ``head="tofd"``: the backbone's stage paths, in order, that follow each
            other (the deep head at ``stages[i]`` copies ``stages[i + 1:]``); default ``paths``.
        feature_path: optional path whose flattened output is returned as
            ``HeadsOutput.final_feature`` (e.g. ``"avgpool"``, the target of self-distillation
            feature hints).
        detach: read the backbone as a frozen teacher (see above).
        hidden: the width of MHKD's hidden ``Linear`` (default: the stage's channels).
        clone: copy the stage outputs when captured; needed when an in-place module (such as
            ``ReLU(inplace=True)``) runs right after a tapped stage and overwrites its output
            (:class:`kdloss.FeatureTap` raises a ``RuntimeError`` saying so otherwise).

    Raises:
        KeyError: for a path that matches no submodule (the message lists the closest names).
        ValueError: when a head's input size cannot be inferred (the path's output is not a
            tensor, is not called by the forward, or lacks the dimensions the head needs), when
            the model's output does not have ``num_classes`` classes, for an unknown ``head`` or
            a ``tofd`` path missing from ``stages``.
        RuntimeError: when the example forward itself fails (with the model and input shape).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
        ...                     nn.Flatten(), nn.Linear(128, 10))
        >>> heads = IntermediateHeads(net, ["0", "2"], 10, example_input=torch.zeros(2, 3, 8, 8))
        >>> heads
        IntermediateHeads(
          paths=['0', '2'], head='dih', detach=True
          (heads): ModuleList(
            (0): ClassifierHead(
              kind='dih'
              (body): Flatten(start_dim=1, end_dim=-1)
              (fc): Linear(in_features=512, out_features=10, bias=True)
            )
            (1): ClassifierHead(
              kind='dih'
              (body): Flatten(start_dim=1, end_dim=-1)
              (fc): Linear(in_features=128, out_features=10, bias=True)
            )
          )
        )
        >>> out = heads(torch.randn(5, 3, 8, 8))
        >>> out.cohort().shape  # (k + 1, B, C)
        torch.Size([3, 5, 10])
    """

    def __init__(
        self,
        model: nn.Module,
        paths: str | Sequence[str],
        num_classes: int,
        *,
        example_input: Tensor | tuple[Any, ...],
        head: HeadType = "dih",
        stages: Sequence[str] | None = None,
        feature_path: str | None = None,
        detach: bool = True,
        hidden: int | None = None,
        clone: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if head not in _HEAD_TYPES:
            raise ValueError(f"head must be one of {', '.join(map(repr, _HEAD_TYPES))}, got {head!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
        if hidden is not None and (isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1):
            raise ValueError(f"hidden must be an int >= 1, got {hidden!r}")
        backbone = unwrap_model(model)  # also strips FrozenTeacher: paths as in the bare model
        self._backbone: tuple[nn.Module] = (backbone,)  # a tuple: referenced, not registered
        self.head_type: HeadType = head
        self.num_classes = num_classes
        self.detach = detach
        self.feature_path = feature_path
        self.paths: list[str] = list(FeatureTap(backbone, paths).modules)  # KeyError for missing paths

        stage_paths = self.paths if stages is None else list(FeatureTap(backbone, list(stages)).modules)
        if head == "tofd":
            missing = [p for p in self.paths if p not in stage_paths]
            if missing:
                raise ValueError(
                    f"head='tofd' needs every head path among stages, the backbone's stages in order; "
                    f"missing {missing}, stages={stage_paths}"
                )
        if feature_path is not None:
            resolved = list(FeatureTap(backbone, feature_path).modules)
            if len(resolved) != 1:
                raise ValueError(f"feature_path must name exactly one submodule, got {feature_path!r} -> {resolved}")
            self.feature_path = resolved[0]
        tap_paths = self.paths + ([self.feature_path] if self.feature_path is not None else [])
        self._tap = FeatureTap(backbone, tap_paths, detach=detach, clone=clone)

        args = example_input if isinstance(example_input, tuple) else (example_input,)
        captured, out = self._example_forward(backbone, tap_paths, args)
        self._check_output(backbone, out)

        named = dict(backbone.named_modules())
        heads: list[ClassifierHead] = []
        for path in self.paths:
            feature = self._example_feature(path, captured)
            rest: list[tuple[str, nn.Module]] = []
            if head == "tofd":
                i = stage_paths.index(path)
                rest = [(p, named[p]) for p in stage_paths[i + 1 :]]
            if head in ("gap", "mhkd") and feature.ndim != 4:
                raise ValueError(
                    f"cannot infer the input size of the {head!r} head at {path!r}: it needs a (B, C, H, W) "
                    f"feature map, got shape {tuple(feature.shape)}; use head='dih' for flat features"
                )
            body = _build_body(head, feature, rest=rest, hidden=hidden).to(device=feature.device, dtype=feature.dtype)
            try:
                with torch.no_grad():
                    body.eval()
                    feat = body(feature)
                    body.train()
            except Exception as exc:
                through = f" through the copied stages {[p for p, _ in rest]}" if rest else ""
                raise ValueError(
                    f"cannot infer the input size of the {head!r} head at {path!r}: running its body{through} on "
                    f"the stage output of shape {tuple(feature.shape)} failed ({type(exc).__name__}: {exc}); "
                    "pass stages= with the backbone's consecutive stages, or choose another head"
                ) from exc
            d = math.prod(feat.shape[1:])
            fc = nn.Linear(d, num_classes).to(device=feature.device, dtype=feature.dtype)
            if feat.ndim != 2:
                body = nn.Sequential(body, nn.Flatten(1))
            heads.append(ClassifierHead(body, fc, kind=head))
        self.heads: nn.ModuleList = nn.ModuleList(heads)

    # -- construction helpers ------------------------------------------------------------------
    @staticmethod
    def _example_forward(
        backbone: nn.Module, tap_paths: list[str], args: tuple[Any, ...]
    ) -> tuple[dict[str, Any], Any]:
        modes = _eval_mode(backbone)
        try:
            with torch.no_grad(), FeatureTap(backbone, tap_paths, detach=True, clone=True) as tap:
                try:
                    out = backbone(*args)
                except Exception as exc:
                    shapes = [tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__ for a in args]
                    raise RuntimeError(
                        f"the example forward of {type(backbone).__name__} failed on example_input {shapes}: "
                        f"{type(exc).__name__}: {exc}"
                    ) from exc
                captured = {p: tap.get(p) for p in tap.modules if p in tap}
        finally:
            _restore_modes(modes)
        return captured, out

    def _check_output(self, backbone: nn.Module, out: Any) -> None:
        if not isinstance(out, Tensor) or out.ndim != 2:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"the model must return (B, C) logits so that its classifier joins the cohort, "
                f"{type(backbone).__name__} returned {got}"
            )
        if out.shape[1] != self.num_classes:
            raise ValueError(
                f"every member of the cohort must predict the same classes: the heads predict num_classes="
                f"{self.num_classes} but {type(backbone).__name__} returns {out.shape[1]} classes"
            )

    @staticmethod
    def _example_feature(path: str, captured: dict[str, Any]) -> Tensor:
        if path not in captured:
            raise ValueError(
                f"cannot infer the input size of the head at {path!r}: the module was not called by the "
                "example forward; mount heads on modules the model's forward runs"
            )
        feature = captured[path]
        if not isinstance(feature, Tensor):
            raise ValueError(
                f"cannot infer the input size of the head at {path!r}: its output is a {type(feature).__name__}, "
                "not a tensor; mount the head on a submodule that returns one tensor"
            )
        if feature.ndim < 2 or not feature.is_floating_point():
            raise ValueError(
                f"cannot infer the input size of the head at {path!r}: expected a floating-point (B, ...) "
                f"feature, got shape {tuple(feature.shape)} and dtype {feature.dtype}"
            )
        return feature

    # -- use -------------------------------------------------------------------------------------
    @property
    def backbone(self) -> nn.Module:
        """The model the heads read from (not a submodule)."""
        return self._backbone[0]

    @property
    def k(self) -> int:
        """The number of heads."""
        return len(self.heads)

    def _run(self, args: tuple[Any, ...], kwargs: dict[str, Any], grad_backbone: bool) -> HeadsOutput:
        backbone = self.backbone
        modes = None if grad_backbone else _eval_mode(backbone)
        try:
            with self._tap as tap:
                with torch.set_grad_enabled(grad_backbone and torch.is_grad_enabled()):
                    logits = backbone(*args, **kwargs)
                feats = [tap[p] for p in self.paths]
                final = tap[self.feature_path].flatten(1) if self.feature_path is not None else None
        finally:
            if modes is not None:
                _restore_modes(modes)
        if not isinstance(logits, Tensor):
            raise TypeError(f"the model must return a logits tensor, got {type(logits).__name__}")
        head_feats: list[Tensor] = []
        head_logits: list[Tensor] = []
        for head, f in zip(cast(list[ClassifierHead], list(self.heads)), feats):
            hf, hl = head.forward_features(f)
            head_feats.append(hf)
            head_logits.append(hl)
        return HeadsOutput(logits, head_logits, head_feats, final)

    def forward(self, *args: Any, **kwargs: Any) -> HeadsOutput:
        """Run the model on its inputs and every head on its stage; see :class:`HeadsOutput`."""
        return self._run(args, kwargs, grad_backbone=not self.detach)

    def extra_repr(self) -> str:
        s = f"paths={self.paths}, head={self.head_type!r}, detach={self.detach}"
        if self.feature_path is not None:
            s += f", feature_path={self.feature_path!r}"
        return s


# -- fine-tuning -------------------------------------------------------------------------------
class FinetuneResult(NamedTuple):
    """What :func:`finetune_heads` did.

    Attributes:
        steps: optimiser steps taken.
        head_losses: each head's mean cross-entropy over the last epoch.
        backbone_unchanged: ``True``: every backbone parameter and buffer was compared bit for bit
            with its value before fine-tuning (a change raises instead).

    Example:
        >>> FinetuneResult(steps=10, head_losses=[0.7, 0.4], backbone_unchanged=True).steps
        10
    """

    steps: int
    head_losses: list[float]
    backbone_unchanged: bool


def _batches_of(item: Any) -> tuple[Tensor, Tensor]:
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise TypeError(f"batches must yield (inputs, labels) pairs, got {type(item).__name__}")
    x, y = item
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError(f"batches must yield (inputs, labels) tensors, got {type(x).__name__}, {type(y).__name__}")
    return x, y


def finetune_heads(
    heads: IntermediateHeads,
    batches: Iterable[Any],
    *,
    epochs: int = 1,
    optimizer: torch.optim.Optimizer | None = None,
    lr: float = 1e-3,
    allow_trainable_backbone: bool = False,
) -> FinetuneResult:
    """Train the heads with cross-entropy on a frozen backbone, and prove the backbone did not change.

    Each step runs the backbone in eval mode under ``torch.no_grad()`` (its BatchNorm statistics
    and weights cannot move), each head on its detached stage output, and minimises the sum of
    the heads' cross-entropies (the heads are independent, so this trains each one on its own).
    Before the first step every backbone parameter and buffer is copied; after the last they are
    compared bit for bit, and any difference raises. Modes (``train``/``eval``) are restored.

    Args:
        heads: the :class:`IntermediateHeads` to train.
        batches: an iterable of ``(inputs, labels)`` pairs (re-iterated once per epoch, so a
            ``DataLoader`` or a list, not a generator, when ``epochs > 1``); already on the
            model's device.
        epochs: passes over ``batches``.
        optimizer: an optimiser over the heads' parameters; default ``Adam(heads.parameters(), lr)``.
            It must hold every trainable head parameter.
        lr: the default optimiser's learning rate.
        allow_trainable_backbone: run even though some backbone parameters still require grad
            (they are still neither differentiated nor stepped here).

    Returns:
        :class:`FinetuneResult`.

    Raises:
        ValueError: if a backbone parameter still requires grad (freeze it with
            ``model.requires_grad_(False)`` or :class:`kdloss.FrozenTeacher`, or pass
            ``allow_trainable_backbone=True``), if ``epochs < 1``, if ``batches`` is empty, or
            if ``optimizer`` misses head parameters.
        RuntimeError: if a backbone parameter or buffer changed (it names them).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(144, 3)).requires_grad_(False)
        >>> heads = IntermediateHeads(net, ["0"], 3, example_input=torch.zeros(2, 3, 8, 8))
        >>> data = [(torch.randn(8, 3, 8, 8), torch.randint(0, 3, (8,)))] * 4
        >>> finetune_heads(heads, data, epochs=2).steps
        8
    """
    if not isinstance(heads, IntermediateHeads):
        raise TypeError(f"heads must be an IntermediateHeads, got {type(heads).__name__}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
    backbone = heads.backbone
    trainable = [n for n, p in backbone.named_parameters() if p.requires_grad]
    if trainable and not allow_trainable_backbone:
        shown = ", ".join(trainable[:5]) + (f", ... ({len(trainable)} in all)" if len(trainable) > 5 else "")
        raise ValueError(
            f"the backbone must be frozen before its heads are fine-tuned, but {len(trainable)} of its parameters "
            f"still require grad: {shown}; call model.requires_grad_(False) (or wrap it in kdloss.FrozenTeacher), "
            "or pass allow_trainable_backbone=True"
        )
    if optimizer is None:
        optimizer = torch.optim.Adam(heads.parameters(), lr=lr)
    else:
        check_optimizer(optimizer, heads)

    snapshot = {k: v.detach().clone() for k, v in backbone.state_dict(keep_vars=True).items()}
    backbone_modes = {m: m.training for m in backbone.modules()}
    heads_modes = {m: m.training for m in heads.modules()}
    backbone.eval()
    heads.train()
    steps = 0
    sums = [0.0] * heads.k
    try:
        for _ in range(epochs):
            sums, seen = [0.0] * heads.k, 0
            for item in batches:
                x, y = _batches_of(item)
                out = heads._run((x,), {}, grad_backbone=False)
                losses = [F.cross_entropy(hl, y) for hl in out.head_logits]
                optimizer.zero_grad(set_to_none=True)
                total = torch.stack(losses).sum()
                total.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
                steps += 1
                seen += 1
                for i, loss in enumerate(losses):
                    sums[i] += float(loss.detach())
            if seen == 0:
                raise ValueError("batches yielded no (inputs, labels) pair; pass a re-iterable such as a DataLoader")
            sums = [s / seen for s in sums]
    finally:
        for m, mode in backbone_modes.items():
            m.training = mode
        for m, mode in heads_modes.items():
            m.training = mode

    after = backbone.state_dict(keep_vars=True)
    changed = [k for k, v in snapshot.items() if k not in after or not torch.equal(after[k].detach(), v)]
    if changed or set(after) != set(snapshot):
        raise RuntimeError(
            f"the backbone changed during head fine-tuning (it must stay bit-identical): {changed[:10]}; "
            "is the model shared with another optimiser or hook?"
        )
    return FinetuneResult(steps, sums, True)


@torch.no_grad()
def evaluate_heads(heads: IntermediateHeads, batches: Iterable[Any]) -> list[float]:
    """Top-1 accuracy of every head and of the model's own classifier, in that order (``k + 1`` values).

    Runs the backbone and heads in eval mode (modes restored afterwards).

    Args:
        heads: the heads, mounted on their backbone.
        batches: an iterable of ``(inputs, labels)`` tensor pairs, e.g. a ``DataLoader``.

    Returns:
        ``k + 1`` accuracies in ``[0, 1]``: the heads in path order, then the model's classifier.

    Raises:
        TypeError: if ``batches`` yields anything but ``(inputs, labels)`` tensor pairs.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
        >>> heads = IntermediateHeads(net, ["0"], 2, example_input=torch.zeros(2, 4))
        >>> len(evaluate_heads(heads, [(torch.randn(6, 4), torch.zeros(6, dtype=torch.long))]))
        2
    """
    backbone = heads.backbone
    modes = {m: m.training for m in [*backbone.modules(), *heads.modules()]}
    backbone.eval()
    heads.eval()
    correct = [0] * (heads.k + 1)
    total = 0
    try:
        for item in batches:
            x, y = _batches_of(item)
            out = heads._run((x,), {}, grad_backbone=False)
            for i, logits in enumerate([*out.head_logits, out.logits]):
                correct[i] += int((logits.argmax(dim=-1) == y).sum())
            total += y.shape[0]
    finally:
        for m, mode in modes.items():
            m.training = mode
    if total == 0:
        raise ValueError("batches yielded no samples")
    return [c / total for c in correct]
