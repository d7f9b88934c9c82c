"""Argument, shape, dtype and device checks shared by every loss, and the library's error type.

Every public function validates its inputs here, up front, so that a bad call fails with a
message naming the argument, the expected and the actual value instead of a bare broadcasting
error deep inside. The checks read only tensor metadata (shape, dtype, device): they never
synchronise with the device (except :func:`check_class_labels`' range check on the CPU).

The shared numerics (``reduce_loss``, ``compute_dtype``, ``pair_up``) live in
:mod:`kdloss._numerics`; they are re-exported here for code written against earlier versions.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from kdloss._numerics import compute_dtype, pair_up, reduce_loss

__all__ = [
    "Reduction",
    "ShapeError",
    "check_batch",
    "check_class_labels",
    "check_float",
    "check_int",
    "check_integer",
    "check_ndim",
    "check_nonnegative",
    "check_option",
    "check_pair",
    "check_positive",
    "check_positive_int",
    "check_reduction",
    "check_row_tensor",
    "check_same_device",
    "check_same_shape",
    "check_unit_interval",
    "check_weights",
    "compute_dtype",
    "deprecated_module",
    "pair_up",
    "reduce_loss",
    "renamed_argument",
    "warn_if_swapped",
]

Reduction = Literal["none", "mean", "batchmean", "sum"]
"""How a loss is reduced: ``"none"`` keeps one value per sample (or position), ``"sum"`` adds
them, ``"batchmean"`` divides that sum by the number of samples (rows) and ``"mean"`` divides it
by the number of elements. Each loss's docstring says exactly what it divides by."""

_REDUCTIONS: tuple[str, ...] = get_args(Reduction)


class ShapeError(ValueError):
    """A tensor has a shape that does not fit the call (a ``ValueError``).

    Example:
        >>> import torch
        >>> from kdloss.functional import hint_loss
        >>> try:
        ...     hint_loss(torch.zeros(2, 8), torch.zeros(2, 16))
        ... except ShapeError as e:
        ...     print(type(e).__name__, isinstance(e, ValueError))
        ShapeError True
    """


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def check_reduction(reduction: str, allowed: Sequence[str] = _REDUCTIONS) -> Reduction:
    """Return ``reduction`` if it is one of ``allowed``, else raise a ``ValueError`` listing them."""
    if reduction not in allowed:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, allowed))}, got {reduction!r}")
    return reduction  # type: ignore[return-value]


def _shown(value: float) -> float:
    """``value`` for an error message. Under ``torch.compile`` a float argument may be symbolic,
    and dynamo of torch 2.11 cannot format one (its f-string fails under ``fullgraph=True``);
    ``float()`` makes it a constant. Ints are shown as they are."""
    return float(value) if isinstance(value, float) else value


def check_positive(name: str, value: float) -> float:
    """Raise unless ``value`` is a finite number greater than zero."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a positive number, got {type(value).__name__} {value!r}")
    # Comparisons only (no math.isfinite): under torch.compile a Python float argument that
    # changes between calls becomes a symbolic float, which math.isfinite cannot trace.
    # NaN fails both comparisons, +inf the second.
    if not (value > 0 and value < math.inf):
        raise ValueError(f"{name} must be a finite number > 0, got {_shown(value)!r}")
    return float(value)


def check_nonnegative(name: str, value: float) -> float:
    """Raise unless ``value`` is a finite number greater than or equal to zero (a loss weight)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number >= 0, got {type(value).__name__} {value!r}")
    if not (value >= 0 and value < math.inf):
        raise ValueError(f"{name} must be a finite number >= 0, got {_shown(value)!r}")
    return float(value)


def check_int(name: str, value: int) -> int:
    """Raise a ``TypeError`` unless ``value`` is an ``int`` (not a ``bool``)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    return value


def check_positive_int(name: str, value: int | None, *, allow_none: bool = False) -> int | None:
    """Raise a ``ValueError`` unless ``value`` is an ``int`` >= 1 (not a ``bool``), or ``None`` with ``allow_none``.

    A size (rows, channels, a chunk): the message is ``"<name> must be a positive int[ or None], got ..."``.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int{' or None' if allow_none else ''}, got {value!r}")
    return value


def check_unit_interval(name: str, value: float, *, open_ends: bool = False) -> float:
    """Raise unless ``value`` lies in [0, 1] (or (0, 1) with ``open_ends``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number in [0, 1], got {type(value).__name__} {value!r}")
    ok = 0.0 < value < 1.0 if open_ends else 0.0 <= value <= 1.0
    if not ok:
        interval = "(0, 1)" if open_ends else "[0, 1]"
        raise ValueError(f"{name} must lie in {interval}, got {_shown(value)!r}")
    return float(value)


def check_tensor(name: str, t: object) -> Tensor:
    """Raise a ``TypeError`` unless ``t`` is a tensor."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_float(name: str, t: Tensor) -> Tensor:
    """Raise a ``TypeError`` unless ``t`` is a floating-point tensor."""
    check_tensor(name, t)
    if not t.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor (float32, float64, bfloat16 or float16), got dtype {t.dtype}"
        )
    return t


def is_integer(t: Tensor) -> bool:
    """Whether ``t`` holds integers (not floating point, complex or bool)."""
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def check_integer(name: str, t: object) -> Tensor:
    """Raise a ``TypeError`` unless ``t`` is an integer tensor (labels, indices); ``bool`` is refused."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be an integer tensor, got {type(t).__name__}")
    if not is_integer(t):
        raise TypeError(f"{name} must be an integer tensor, got dtype {t.dtype}")
    return t


def check_class_labels(labels: object, logits: Tensor) -> Tensor:
    """Raise unless ``labels`` are ``(B,)`` integer class indices for ``(B, C)`` ``logits``, on their device.

    The range ``[0, C)`` is checked for CPU tensors outside ``torch.compile`` only: reading a CUDA
    tensor's values would make every step wait for the device (an out-of-range label then fails
    in the CUDA kernel that indexes with it).
    """
    t = check_integer("labels", labels)
    batch, classes = logits.shape[0], logits.shape[-1]
    if t.shape != (batch,):
        raise ShapeError(f"labels must have shape (B,) = ({batch},), got {tuple(t.shape)}")
    if t.device != logits.device:
        raise ValueError(f"labels must be on the logits' device {logits.device}, got {t.device}")
    if t.device.type == "cpu" and t.numel() > 0 and not torch.compiler.is_compiling():
        lo_t, hi_t = torch.aminmax(t)  # one pass for both bounds
        lo, hi = int(lo_t), int(hi_t)
        if lo < 0 or hi >= classes:
            raise ValueError(f"labels must lie in [0, {classes}) (C = {classes}), got values in [{lo}, {hi}]")
    return t


def check_ndim(name: str, t: Tensor, ndims: Sequence[int], meaning: str = "") -> Tensor:
    """Raise a :class:`ShapeError` unless ``t.ndim`` is one of ``ndims``."""
    if t.ndim not in ndims:
        want = " or ".join(str(n) for n in ndims)
        extra = f" {meaning}" if meaning else ""
        raise ShapeError(f"{name} must have {want} dimensions{extra}, got shape {_shape(t)}")
    return t


def check_same_device(**tensors: Tensor) -> None:
    """Raise a ``ValueError`` unless every tensor lives on the same device."""
    items = list(tensors.items())
    name0, t0 = items[0]
    for name, t in items[1:]:
        if t.device != t0.device:
            raise ValueError(f"{name0} and {name} must be on the same device, got {t0.device} and {t.device}")


def check_same_shape(name_a: str, a: Tensor, name_b: str, b: Tensor, *, hint: str = "") -> None:
    """Raise a :class:`ShapeError` unless ``a`` and ``b`` have the same shape.

    The message says which dimension differs: the batch (first), the classes (last) or another.
    """
    if a.shape == b.shape:
        return
    sa, sb = _shape(a), _shape(b)
    detail = ""
    if a.ndim == b.ndim and a.ndim > 0:
        if sa[0] != sb[0]:
            detail = f" (batch size {sa[0]} vs {sb[0]})"
        elif a.ndim > 1 and sa[-1] != sb[-1] and sa[:-1] == sb[:-1]:
            detail = f" (class count {sa[-1]} vs {sb[-1]})"
    suffix = f"; {hint}" if hint else ""
    raise ShapeError(f"{name_a} and {name_b} must have the same shape, got {sa} and {sb}{detail}{suffix}")


def check_pair(name_a: str, a: Tensor, name_b: str, b: Tensor, *, hint: str = "") -> None:
    """A student/teacher pair: two floating-point tensors of one shape on one device (see the checks used)."""
    if (  # the usual case in one expression; anything else goes through the checks that explain it
        isinstance(a, Tensor)
        and isinstance(b, Tensor)
        and a.shape == b.shape
        and a.device == b.device
        and a.is_floating_point()
        and b.is_floating_point()
    ):
        return
    check_float(name_a, a)
    check_float(name_b, b)
    check_same_device(**{name_a: a, name_b: b})
    check_same_shape(name_a, a, name_b, b, hint=hint)


def check_batch(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    """Raise a :class:`ShapeError` unless ``a`` and ``b`` have the same first dimension."""
    if a.ndim == 0 or b.ndim == 0 or a.shape[0] != b.shape[0]:
        raise ShapeError(
            f"{name_a} and {name_b} must have the same batch size (first dimension), "
            f"got shapes {_shape(a)} and {_shape(b)}"
        )


def check_option(name: str, value: str, allowed: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``allowed`` (a string option), else raise a ``ValueError`` listing them."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return value


def check_row_tensor(name: str, t: Tensor, rows_shape: torch.Size, device: torch.device) -> None:
    """Raise unless ``t`` (a per-row mask or weight) has the logits' shape without the classes, on their device."""
    if t.shape != rows_shape:
        raise ShapeError(
            f"{name} must have the logits' shape without the class dimension, {tuple(rows_shape)}, got {tuple(t.shape)}"
        )
    if t.device != device:
        raise ValueError(f"{name} must be on the logits' device {device}, got {t.device}")


def check_weights(weights: Sequence[float] | Tensor | None, k: int, what: str) -> list[float] | None:
    """``K`` per-member weights (a sequence or a tensor) as floats, or ``None``; raise unless there is one
    finite, non-negative weight per ``what`` and not all are zero (a tensor is read on the host)."""
    if weights is None:
        return None
    values = weights.tolist() if isinstance(weights, Tensor) else list(weights)
    if len(values) != k:
        raise ValueError(f"weights must hold one weight per {what} ({k}), got {len(values)}")
    for i, w in enumerate(values):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"weights[{i}] must be a finite number >= 0, got {w!r}")
    if sum(values) <= 0:
        raise ValueError(f"weights must not all be zero, got {values}")
    return [float(w) for w in values]


def warn_if_swapped(student_name: str, student: Tensor, teacher_name: str, teacher: Tensor) -> None:
    """Warn when the teacher side requires grad and the student side does not: the likely swap.

    The teacher is detached inside the losses, so with the two swapped the loss has no gradient
    at all and training silently does nothing. (Both requiring grad, as in mutual learning, is
    fine, and so is anything under ``torch.no_grad``.) Skipped while ``torch.compile`` traces.
    """
    if (
        teacher.requires_grad
        and not student.requires_grad
        and torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
    ):
        warnings.warn(
            f"{teacher_name} requires grad but {student_name} does not: are the arguments swapped? The order is "
            f"({student_name}, {teacher_name}); the teacher side is detached, so this loss has no gradient",
            UserWarning,
            stacklevel=_caller_level(),
        )


def renamed_argument(owner: str, new: str, value: float | None, old: str, old_value: float | None) -> float | None:
    """The value of an argument that was renamed from ``old`` to ``new``: ``value``, or ``old_value``
    (with a ``FutureWarning`` pointing at the caller's line) when only the former name was used.

    Raises:
        TypeError: if both names are given.
    """
    if old_value is None:
        return value
    if value is not None:
        raise TypeError(f"{owner} got {new}={value!r} and its former name {old}={old_value!r}: pass {new}= only")
    warnings.warn(
        f"{owner}: {old}= is deprecated, pass {new}= (same meaning): {old} names several weights in kdloss",
        FutureWarning,
        stacklevel=_caller_level(),
    )
    return old_value


def deprecated_module(
    name: str, home: ModuleType, names: Sequence[str] | None = None
) -> tuple[list[str], Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__all__``, ``__getattr__`` and ``__dir__`` of ``name``, a module of earlier versions that now
    re-exports ``names`` (default: ``home.__all__``) from ``home``; warns, when it is imported, with a
    ``FutureWarning`` at the importing line that says where to import from.

    Example (the whole body of such a module, after its docstring)::

        from kdloss._validate import deprecated_module
        from kdloss.parts import adapters

        __all__, __getattr__, __dir__ = deprecated_module(__name__, adapters)
    """
    public = list(names if names is not None else home.__all__)
    warnings.warn(
        f"{name} is deprecated: import from kdloss (or {home.__name__})",
        FutureWarning,
        stacklevel=3,  # this function, the deprecated module's body, then the line that imports it
    )

    def module_getattr(attr: str) -> Any:
        if attr in public:
            return getattr(home, attr)
        raise AttributeError(f"module {name!r} has no attribute {attr!r}")

    def module_dir() -> list[str]:
        return sorted({*vars(sys.modules[name]), *public})

    return public, module_getattr, module_dir


def _caller_level() -> int:
    """The ``stacklevel`` of the first frame outside kdloss and torch, as seen from the function that
    calls this one: a warning then points at the user's line, through modules and ``nn.Module`` calls."""
    frame = sys._getframe(1)
    level = 1
    while frame.f_back is not None and str(frame.f_globals.get("__name__", "")).split(".")[0] in ("kdloss", "torch"):
        frame = frame.f_back
        level += 1
    return level
