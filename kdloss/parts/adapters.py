"""Feature adapters: the trainable (or parameter-free) maps that make a student feature match a teacher's.

Adapters live on the student side: their parameters must be handed to the optimiser, wrapped
in DDP and saved in checkpoints together with the student. :func:`adapter_parameters` collects
them and :func:`check_optimizer` fails loudly when some are missing. As a last guard, a trainable
adapter warns once when its weights are still exactly at their initial values after
``stale_check_steps`` training forwards although gradients reached them, which is what
happens when it was left out of the optimiser.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdloss._validate import ShapeError, check_float

__all__ = [
    "Adapter",
    "ConvAdapter",
    "LinearAdapter",
    "PoolAdapter",
    "adapter_for",
    "adapter_parameters",
    "check_optimizer",
]


_GLOBAL_HOOKS = tuple(
    getattr(nn.modules.module, name, {})
    for name in (
        "_global_forward_pre_hooks",
        "_global_forward_hooks",
        "_global_backward_pre_hooks",
        "_global_backward_hooks",
        "_global_forward_hooks_always_called",
    )
)


def _call(module: nn.Module, x: Tensor) -> Tensor:
    """``module(x)``, without ``nn.Module.__call__``'s bookkeeping (a few microseconds, as much as a small
    convolution) when no hook, of that module or global, would run; with hooks, the ordinary call."""
    if (
        module._forward_pre_hooks
        or module._forward_hooks
        or module._backward_pre_hooks
        or module._backward_hooks
        or any(_GLOBAL_HOOKS)
    ):
        return module(x)  # type: ignore[no-any-return]
    return module.forward(x)  # type: ignore[no-any-return]


def _weight(module: nn.Module | None) -> Tensor:
    """``module.weight`` (from ``_parameters`` when it is a plain parameter, as it is unless parametrised)."""
    assert module is not None
    w = module._parameters.get("weight")
    return w if w is not None else module.weight  # type: ignore[return-value]


class Adapter(nn.Module):
    """Base class of kdloss's adapters: shape checks with context and the forgotten-optimiser guard.

    Subclasses implement :meth:`_forward`. ``stale_check_steps`` is the training forward at
    which the guard compares the weights with their initial values (0 disables it). The guard
    runs only in training mode with gradients enabled and outside ``torch.compile``; it warns
    (``RuntimeWarning``) once when gradients reached the weights but the weights did not move.
    With gradient accumulation over more than ``stale_check_steps`` forwards, raise it.

    Dtypes: under autocast the layers follow autocast. Outside it, an input of another float
    dtype than the parameters (float16 or bfloat16 features into a float32 adapter) is cast to
    the parameters' dtype, and so is the output (``adapter.half()`` keeps everything in half).

    Args:
        stale_check_steps: the training forward at which to check (``>= 0``; 0 disables it).

    Raises:
        TypeError: if ``stale_check_steps`` is not an int.
        ValueError: if ``stale_check_steps`` is negative.

    Example:
        >>> import torch
        >>> class Scale(Adapter):
        ...     def __init__(self) -> None:
        ...         super().__init__(stale_check_steps=0)
        ...         self.w = torch.nn.Parameter(torch.ones(()))
        ...     def _forward(self, x: torch.Tensor) -> torch.Tensor:
        ...         return self.w * x
        >>> Scale()(torch.ones(2))
        tensor([1., 1.], grad_fn=<MulBackward0>)
    """

    def __init__(self, *, stale_check_steps: int = 8) -> None:
        super().__init__()
        if isinstance(stale_check_steps, bool) or not isinstance(stale_check_steps, int):
            raise TypeError(f"stale_check_steps must be an int, got {type(stale_check_steps).__name__}")
        if stale_check_steps < 0:
            raise ValueError(f"stale_check_steps must be >= 0, got {stale_check_steps}")
        self.stale_check_steps = stale_check_steps
        self._forwards = 0
        self._saw_grad = False
        self._initial: list[Tensor] | None = None

    def _forward(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        check_float("x", x)
        if self.training and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            self._watch_for_stale_weights()
        return self._forward(self._in_param_dtype(x))

    def _first_parameter(self) -> Tensor | None:
        """The parameter whose dtype the input is cast to (the first one; subclasses name it directly,
        which is cheaper than walking ``parameters()`` on every call)."""
        for p in self.parameters():
            return p
        return None

    def _in_param_dtype(self, x: Tensor) -> Tensor:
        """Outside autocast, ``x`` in the parameters' float dtype (float16/bfloat16 features, float32 weights).

        Under autocast the layers cast themselves; a parameter-free adapter keeps ``x`` as it is.
        """
        p = self._first_parameter()
        if (
            p is not None
            and p.dtype != x.dtype
            and p.is_floating_point()
            and not torch.is_autocast_enabled(x.device.type)
        ):
            return x.to(p.dtype)
        return x

    def _watch_for_stale_weights(self) -> None:
        if not self.stale_check_steps or self._forwards > self.stale_check_steps:
            return
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            self._forwards = self.stale_check_steps + 1
            return
        # Gradients may be set to None before each forward (optimizer.zero_grad()), so remember
        # whether any forward saw one.
        self._saw_grad = self._saw_grad or any(p.grad is not None for p in params)
        if self._forwards == 0:
            self._initial = [p.detach().clone() for p in params]
        elif self._forwards == self.stale_check_steps and self._initial is not None:
            got_grads = self._saw_grad
            unchanged = all(torch.equal(p.detach(), p0) for p, p0 in zip(params, self._initial))
            if got_grads and unchanged:
                warnings.warn(
                    f"{type(self).__name__}'s weights received gradients but have not changed after "
                    f"{self.stale_check_steps} training steps: it is probably missing from the optimiser. "
                    "Pass kdloss.adapter_parameters(adapter) (or adapter.parameters()) to it.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            self._initial = None
        self._forwards += 1


class ConvAdapter(Adapter):
    """A ``k x k`` convolution (1x1 by default, FitNets' regressor) with optional BatchNorm and ReLU.

    Maps ``(B, in_channels, H, W)`` to ``(B, out_channels, H, W)`` ("same" padding), as the
    PyTorch KD tutorial's ``Conv2d(16, 32, kernel_size=3, padding=1)`` regressor does.

    Args:
        in_channels: the student feature's channels.
        out_channels: the teacher feature's channels.
        kernel_size: an odd kernel size (1 or 3 usually).
        bn: add a ``BatchNorm2d`` after the convolution (its bias then replaces the conv's).
        relu: add a ReLU at the end.
        stale_check_steps: see :class:`Adapter` (the forgotten-optimiser guard).

    Shape:
        ``(B, in_channels, H, W) -> (B, out_channels, H, W)``.

    Raises:
        ValueError: for channel counts below 1 or an even ``kernel_size``.
        ShapeError: (in ``forward``) for an input that is not ``(B, in_channels, H, W)``.
        TypeError: (in ``forward``) for a non-floating-point input.

    Romero et al., *FitNets: Hints for Thin Deep Nets*, ICLR 2015 (the regressor).

    Example:
        >>> import torch
        >>> ConvAdapter(16, 32, kernel_size=3)(torch.zeros(2, 16, 8, 8)).shape
        torch.Size([2, 32, 8, 8])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        *,
        bn: bool = False,
        relu: bool = False,
        stale_check_steps: int = 8,
    ) -> None:
        super().__init__(stale_check_steps=stale_check_steps)
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd number >= 1 (to keep the spatial size), got {kernel_size}")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=not bn)
        self.bn = nn.BatchNorm2d(out_channels) if bn else nn.Identity()
        self.relu = nn.ReLU() if relu else nn.Identity()

    def _first_parameter(self) -> Tensor | None:
        return _weight(self._modules["conv"])

    def _forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ShapeError(
                f"ConvAdapter({self.in_channels} -> {self.out_channels}) expects x of shape "
                f"(B, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        # (submodules read from _modules: nn.Module.__getattr__ costs a fraction of a microsecond each)
        mods = self._modules
        out: Tensor = _call(mods["conv"], x)  # type: ignore[arg-type]
        # The identity stages are skipped, not called (a module call costs microseconds at small sizes).
        bn, relu = mods["bn"], mods["relu"]
        if not isinstance(bn, nn.Identity):
            out = bn(out)  # type: ignore[misc]
        if not isinstance(relu, nn.Identity):
            out = relu(out)  # type: ignore[misc]
        return out


class LinearAdapter(Adapter):
    """A linear map of flattened features, ``(B, *) -> (B, out_features)``.

    Args:
        in_features: the number of elements of one student sample (``prod(*)``).
        out_features: the number of elements of one teacher sample.
        bias: add a bias.
        stale_check_steps: see :class:`Adapter` (the forgotten-optimiser guard).

    Shape:
        ``(B, *) -> (B, out_features)`` with ``prod(*) == in_features``.

    Raises:
        ValueError: for sizes below 1.
        ShapeError: (in ``forward``) for an input with another number of elements per sample.

    Example:
        >>> import torch
        >>> LinearAdapter(1024, 2048)(torch.zeros(4, 16, 8, 8)).shape
        torch.Size([4, 2048])
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True, stale_check_steps: int = 8) -> None:
        super().__init__(stale_check_steps=stale_check_steps)
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        self.in_features, self.out_features = in_features, out_features
        self.linear = nn.Linear(in_features, out_features, bias=bias)

    def _first_parameter(self) -> Tensor | None:
        return _weight(self._modules["linear"])

    def _forward(self, x: Tensor) -> Tensor:
        flat = x.flatten(1)
        if flat.shape[1] != self.in_features:
            raise ShapeError(
                f"LinearAdapter({self.in_features} -> {self.out_features}) expects {self.in_features} "
                f"features per sample, got {flat.shape[1]} (input shape {tuple(x.shape)})"
            )
        out: Tensor = _call(self.linear, flat)
        return out


class PoolAdapter(Adapter):
    """Parameter-free average pooling down to a target size.

    For flattened features ``(B, D)`` (any ``(B, *)`` input is flattened), ``out_size`` is an
    integer that divides ``D`` and the features are averaged in groups of ``D // out_size``
    neighbours: the tutorial's ``avg_pool1d(kernel_size=2)`` of the teacher's 2048 features to
    1024. For feature maps ``(B, C, H, W)`` with ``out_size=(h, w)``, ``adaptive_avg_pool2d``.
    It has no parameters, so it can sit on the teacher side as well.

    Args:
        out_size: the number of features to pool down to, or the ``(h, w)`` of a feature map.

    Shape:
        ``(B, *) -> (B, out_size)`` or ``(B, C, H, W) -> (B, C, h, w)``.

    Raises:
        ValueError: for a size below 1 or a tuple that is not ``(h, w)``.
        ShapeError: (in ``forward``) for a feature count that ``out_size`` does not divide, fewer
            features than ``out_size``, or a non-4-D input with ``(h, w)``.

    Example:
        >>> import torch
        >>> PoolAdapter(1024)(torch.randn(4, 32, 8, 8)).shape
        torch.Size([4, 1024])
        >>> PoolAdapter((4, 4))(torch.randn(4, 32, 8, 8)).shape
        torch.Size([4, 32, 4, 4])
    """

    def __init__(self, out_size: int | tuple[int, int]) -> None:
        super().__init__(stale_check_steps=0)
        sizes = (out_size,) if isinstance(out_size, int) else tuple(out_size)
        if len(sizes) not in (1, 2) or any(s < 1 for s in sizes):
            raise ValueError(f"out_size must be a positive int or an (h, w) pair, got {out_size!r}")
        self.out_size = out_size

    def _forward(self, x: Tensor) -> Tensor:
        if isinstance(self.out_size, int):
            flat = x.flatten(1)
            d = flat.shape[1]
            if d < self.out_size:
                raise ShapeError(
                    f"PoolAdapter({self.out_size}) can only pool down: got {d} features, fewer than "
                    f"{self.out_size} (input shape {tuple(x.shape)}); use a LinearAdapter on the student side"
                )
            if d % self.out_size:
                raise ShapeError(
                    f"PoolAdapter({self.out_size}) needs a feature count divisible by {self.out_size}, "
                    f"got {d} (input shape {tuple(x.shape)})"
                )
            k = d // self.out_size
            return F.avg_pool1d(flat.unsqueeze(1), kernel_size=k).squeeze(1) if k > 1 else flat
        if x.ndim != 4:
            raise ShapeError(f"PoolAdapter({self.out_size}) expects a (B, C, H, W) map, got {tuple(x.shape)}")
        return F.adaptive_avg_pool2d(x, self.out_size)

    def extra_repr(self) -> str:
        return f"out_size={self.out_size}"


def adapter_for(
    student_example: Tensor, teacher_example: Tensor, *, kernel_size: int = 1, bn: bool = False, relu: bool = False
) -> nn.Module:
    """Build the adapter that maps features shaped like ``student_example`` to ``teacher_example``.

    - same shape: ``nn.Identity()`` (no adapter is created when none is needed);
    - ``(B, C_s, H, W) -> (B, C_t, H, W)``: :class:`ConvAdapter` (``kernel_size``, ``bn``, ``relu``);
    - ``(B, C_s, H_s, W_s) -> (B, C_t, H_t, W_t)`` with a larger student map: a
      :class:`ConvAdapter` followed by a :class:`PoolAdapter` to ``(H_t, W_t)``;
    - anything else of equal batch: :class:`LinearAdapter` on the flattened features, reshaped
      to the teacher's per-sample shape.

    The adapter is created on the student example's device, in its dtype if that is float32 or
    float64 and in float32 otherwise (features computed under autocast are float16/bfloat16, the
    weights should not be). Hand its parameters to the optimiser (:func:`adapter_parameters`).

    Args:
        student_example: a student feature, ``(B, *)``.
        teacher_example: the teacher feature it must match, ``(B, *)``.
        kernel_size: the :class:`ConvAdapter`'s kernel size (odd).
        bn: add BatchNorm to a :class:`ConvAdapter`.
        relu: add a ReLU to a :class:`ConvAdapter`.

    Raises:
        ShapeError: if the batch sizes differ, or the student map is smaller than the teacher's.
        TypeError: if an example is not a floating-point tensor.

    Example:
        >>> import torch
        >>> adapter_for(torch.zeros(2, 16, 8, 8), torch.zeros(2, 32, 8, 8))
        ConvAdapter(
          (conv): Conv2d(16, 32, kernel_size=(1, 1), stride=(1, 1))
          (bn): Identity()
          (relu): Identity()
        )
    """
    check_float("student_example", student_example)
    check_float("teacher_example", teacher_example)
    s, t = student_example.shape, teacher_example.shape
    if not s or not t or s[0] != t[0]:
        raise ShapeError(
            f"student_example and teacher_example must share the batch dimension, got {tuple(s)} and {tuple(t)}"
        )
    device, dtype = student_example.device, student_example.dtype
    if dtype not in (torch.float32, torch.float64):
        dtype = torch.float32  # keep trainable weights in float32 when the features come from autocast
    if s == t:
        return nn.Identity()
    if len(s) == 4 and len(t) == 4:
        conv = ConvAdapter(s[1], t[1], kernel_size, bn=bn, relu=relu).to(device=device, dtype=dtype)
        if s[2:] == t[2:]:
            return conv
        if s[2] < t[2] or s[3] < t[3]:
            raise ShapeError(
                f"the student map {tuple(s)} is spatially smaller than the teacher's {tuple(t)}: pool the "
                "teacher instead (PoolAdapter on the teacher side) or tap a larger student layer"
            )
        pooled: nn.Module = nn.Sequential(conv, PoolAdapter((t[2], t[3])))
        return pooled
    linear = LinearAdapter(int(student_example[0].numel()), int(teacher_example[0].numel())).to(
        device=device, dtype=dtype
    )
    if len(t) == 2:
        return linear
    reshaped: nn.Module = nn.Sequential(linear, nn.Unflatten(1, tuple(t[1:])))
    return reshaped


def adapter_parameters(*modules: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters of the given adapters (or any modules), each once, in order.

    Hand them to the optimiser together with the student's parameters (or as their own
    parameter group, e.g. with another learning rate).

    Args:
        modules: adapters, or any modules (``nn.Identity`` contributes nothing).

    Raises:
        TypeError: if an argument is not an ``nn.Module``.

    Example:
        >>> import torch
        >>> student = torch.nn.Linear(4, 4)
        >>> adapter = ConvAdapter(16, 32)
        >>> opt = torch.optim.SGD([*student.parameters(), *adapter_parameters(adapter)], lr=0.1)
        >>> check_optimizer(opt, adapter)
    """
    seen: set[int] = set()
    out: list[nn.Parameter] = []
    for i, m in enumerate(modules):
        if not isinstance(m, nn.Module):
            raise TypeError(f"adapter_parameters takes nn.Modules, got {type(m).__name__} as argument {i}")
        for p in m.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def check_optimizer(optimizer: torch.optim.Optimizer, *modules: nn.Module) -> None:
    """Raise a ``ValueError`` naming every trainable parameter of ``modules`` not in ``optimizer``.

    Call it once after building the optimiser: adapters created by :func:`adapter_for` after the
    optimiser was built are the usual culprit.

    Args:
        optimizer: the optimiser that trains the student.
        modules: the adapters (or any modules) whose trainable parameters it must hold.

    Raises:
        TypeError: if ``optimizer`` is not a ``torch.optim.Optimizer``.
        ValueError: listing the missing parameters by name.

    Example:
        >>> import torch
        >>> adapter = ConvAdapter(16, 32)
        >>> opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
        >>> check_optimizer(opt, adapter)
        Traceback (most recent call last):
        ...
        ValueError: optimizer is missing 2 trainable adapter parameter(s): ConvAdapter.conv.weight, ...
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    in_opt = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [
        f"{type(m).__name__}.{name}"
        for m in modules
        for name, p in m.named_parameters()
        if p.requires_grad and id(p) not in in_opt
    ]
    if missing:
        raise ValueError(
            f"optimizer is missing {len(missing)} trainable adapter parameter(s): {', '.join(missing)}; "
            "add kdloss.adapter_parameters(...) to its parameters"
        )
