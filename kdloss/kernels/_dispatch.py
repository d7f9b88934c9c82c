"""Whether a loss takes a fused kernel: the mode, the per-key self-check verdicts and :func:`status`.

A *key* is ``(device, kernel, student dtype, teacher dtype)``. In the default mode (``verify``)
the first fused call of a key in a process runs the kernel's self-check
(:mod:`kdloss.kernels._selfcheck`) and caches the verdict; a key whose check fails, or whose
kernel raises at launch, takes the eager path for the rest of the process, with one
:class:`KernelFallbackWarning`. Nothing here imports Triton until a fused call is considered.
"""

from __future__ import annotations

import importlib
import os
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, ParamSpec, TypeVar

import torch
from torch import Tensor

from kdloss.kernels._common import FUSED_DTYPES

__all__ = [
    "KERNELS",
    "KernelFallbackWarning",
    "KernelName",
    "KernelStatus",
    "KernelsMode",
    "kernels_available",
    "kernels_enabled",
    "kernels_mode",
    "run_guarded",
    "set_kernels_enabled",
    "set_kernels_mode",
    "status",
    "use_fused",
    "verify",
]

KernelName = Literal["soft_kl", "cohort", "attention"]
"""The fused ops: ``"soft_kl"`` (behind ``soft_kl`` and ``kd_ce_loss``), ``"cohort"`` (``cohort_kd``),
``"attention"`` (``attention_loss``)."""

KernelsMode = Literal["off", "on", "verify"]
"""``"off"``: never use the kernels. ``"on"``: use them without the self-check (benchmarks).
``"verify"`` (default): use a kernel once its self-check has passed on that device and dtype."""

KERNELS: tuple[KernelName, ...] = ("soft_kl", "cohort", "attention")
ENV = "KDLOSS_KERNELS"
DEPRECATED_ENV = "KDLOSS_DISABLE_KERNELS"
_MODES: dict[str, KernelsMode] = {"off": "off", "on": "on", "verify": "verify"}

# Device types on which a fused call is considered: CUDA. (The interpreter tests add "cpu", where
# Triton's interpreter runs the kernels.)
_DEVICE_TYPES: tuple[str, ...] = ("cuda",)

_Key = tuple[torch.device, str, torch.dtype, torch.dtype]

P = ParamSpec("P")
R = TypeVar("R")


class KernelFallbackWarning(UserWarning):
    """A fused kernel failed its self-check or raised at launch; that key now runs the eager path."""


@dataclass(frozen=True)
class KernelStatus:
    """The state of one ``(device, kernel, dtype)`` key, as :func:`status` reports it.

    Attributes:
        device: e.g. ``"cuda:0"``.
        kernel: one of :data:`KERNELS`.
        dtype: the logits' dtype, ``"bfloat16"``; ``"student/teacher"`` when the two differ.
        fused: whether calls with this key take the fused kernel now.
        reason: why (or why not), in words.
        check_ms: the self-check's wall time in milliseconds, when one ran.
    """

    device: str
    kernel: str
    dtype: str
    fused: bool
    reason: str
    check_ms: float | None = None


@dataclass(frozen=True)
class _Verdict:
    fused: bool
    reason: str
    check_ms: float | None = None


_verdicts: dict[_Key, _Verdict] = {}
_seen: set[_Key] = set()
_lock = threading.RLock()
_triton_ok: bool | None = None
_enabled = True
_mode_override: KernelsMode | None = None
_env_cache: tuple[str | None, str | None, KernelsMode] | None = None
_deprecation_warned = False


# --------------------------------------------------------------------------- the mode


def kernels_available() -> bool:
    """Whether Triton can be imported (checked once, on the first call)."""
    global _triton_ok
    if _triton_ok is None:
        try:
            importlib.import_module("triton")
        except Exception:  # ImportError, or a broken install
            _triton_ok = False
        else:
            _triton_ok = True
    return _triton_ok


def _mode_from_env() -> KernelsMode:
    """``KDLOSS_KERNELS`` (default ``verify``), and the deprecated ``KDLOSS_DISABLE_KERNELS``."""
    global _env_cache, _deprecation_warned
    raw, old = os.environ.get(ENV), os.environ.get(DEPRECATED_ENV)
    if old is not None and not _deprecation_warned:
        _deprecation_warned = True
        # FutureWarning, Python's category for deprecations aimed at end users: a DeprecationWarning
        # raised from library code is hidden by the default filters, and whoever set the variable
        # would never see it.
        warnings.warn(
            f"{DEPRECATED_ENV} is deprecated: use {ENV}=off (or on / verify) instead",
            FutureWarning,
            stacklevel=4,
        )
    cache = _env_cache
    if cache is not None and cache[0] == raw and cache[1] == old:
        return cache[2]
    mode: KernelsMode = "verify"
    if raw is not None and raw.strip() != "":
        found = _MODES.get(raw.strip().lower())
        if found is None:
            raise ValueError(f"environment variable {ENV} must be one of 'off', 'on', 'verify', got {raw!r}")
        mode = found
    if old is not None and old.strip() not in ("", "0"):
        if mode != "off" and raw is not None and raw.strip() != "":
            raise ValueError(
                f"environment variables {DEPRECATED_ENV}={old!r} (deprecated) and {ENV}={raw!r} disagree: "
                f"{DEPRECATED_ENV} switches the fused kernels off; unset it and keep {ENV}"
            )
        mode = "off"
    _env_cache = (raw, old, mode)
    return mode


def kernels_mode() -> KernelsMode:
    """The mode in force: ``"off"``, ``"on"`` or ``"verify"`` (see :data:`KernelsMode`).

    ``"off"`` after :func:`set_kernels_enabled` ``(False)``; else the mode given to
    :func:`set_kernels_mode`; else the environment variable ``KDLOSS_KERNELS`` (read at each call;
    default ``verify``). The deprecated ``KDLOSS_DISABLE_KERNELS`` (not ``0``) still means
    ``off``, with a ``FutureWarning`` (the deprecation category users see by default).

    Raises:
        ValueError: for a ``KDLOSS_KERNELS`` value other than ``off``, ``on``, ``verify``, or when
            it asks for the kernels while ``KDLOSS_DISABLE_KERNELS`` switches them off.

    Example:
        >>> from kdloss.kernels import kernels_mode, set_kernels_mode
        >>> set_kernels_mode("on"); kernels_mode()
        'on'
        >>> set_kernels_mode(None)  # back to the environment variable
    """
    if not _enabled:
        return "off"
    if _mode_override is not None:
        return _mode_override
    return _mode_from_env()


def set_kernels_mode(mode: KernelsMode | None) -> None:
    """Set the mode process-wide (``"off"``, ``"on"``, ``"verify"``), or ``None`` to follow ``KDLOSS_KERNELS``.

    Raises:
        ValueError: for any other value.
    """
    global _mode_override
    if mode is not None and mode not in _MODES:
        raise ValueError(f"mode must be one of 'off', 'on', 'verify' or None, got {mode!r}")
    _mode_override = mode


def set_kernels_enabled(enabled: bool) -> None:
    """Forbid (``False``) the fused kernels process-wide, or lift that (``True``, the default).

    ``False`` overrides every mode; ``True`` returns to :func:`set_kernels_mode`'s mode or the
    environment variable.

    Example:
        >>> from kdloss.kernels import kernels_enabled, set_kernels_enabled
        >>> set_kernels_enabled(False); kernels_enabled()
        False
        >>> set_kernels_enabled(True)
    """
    global _enabled
    _enabled = bool(enabled)


def kernels_enabled() -> bool:
    """Whether the mode in force (:func:`kernels_mode`) is other than ``"off"``."""
    return kernels_mode() != "off"


# --------------------------------------------------------------------------- the dispatch gate


def use_fused(student_logits: Tensor, teacher_logits: Tensor, kernel: KernelName = "soft_kl") -> bool:
    """Whether a call of ``kernel`` on these (already validated) tensors takes the fused kernel.

    True only on CUDA, for float32/bfloat16/float16 inputs, outside ``torch.compile`` tracing
    (the compiler fuses the eager path itself), when the mode is not ``off``, Triton imports, and
    (mode ``verify``) the kernel has passed its self-check for this device and dtype pair. The
    first call of a key runs that check (a few milliseconds, one host synchronisation) and
    caches the verdict. It never raises for a failing kernel: that key takes the eager path, with
    one :class:`KernelFallbackWarning`.

    Raises:
        RuntimeError: when the check is due inside CUDA-graph capture (it would synchronise):
            run one step before capturing, or call :func:`verify` first.
        ValueError: for an unknown ``kernel`` or a bad ``KDLOSS_KERNELS`` value.

    Example:
        >>> import torch
        >>> use_fused(torch.zeros(2, 3), torch.zeros(2, 3))  # CPU: always the eager path
        False
    """
    if torch.compiler.is_compiling():  # first: under dynamo this folds to False before anything is traced
        return False
    device = student_logits.device
    if (
        device.type not in _DEVICE_TYPES
        or student_logits.dtype not in FUSED_DTYPES
        or teacher_logits.dtype not in FUSED_DTYPES
    ):
        return False
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(map(repr, KERNELS))}, got {kernel!r}")
    key: _Key = (device, kernel, student_logits.dtype, teacher_logits.dtype)
    mode = kernels_mode()
    if mode == "off" or not kernels_available():
        _seen.add(key)
        return False
    verdict = _verdicts.get(key)
    if verdict is not None:
        return verdict.fused
    if mode == "on":
        _seen.add(key)
        return True
    return _verify_key(key, force=False).fused


def run_guarded(
    kernel: KernelName,
    student: Tensor,
    teacher: Tensor,
    fn: Callable[P, R],
    *args: P.args,
    **kwargs: P.kwargs,
) -> R | None:
    """``fn(*args, **kwargs)``, or ``None`` if it raises: then the key of ``(student, teacher)`` falls back.

    The fused call sites run the kernel through this, after :func:`use_fused` said yes, and take
    the eager path on ``None``: a kernel that fails to compile or launch for some shape switches
    its key to the eager path with one :class:`KernelFallbackWarning` instead of raising into the
    training step. Out-of-memory errors are raised as they are (they are not the kernel's fault,
    and the eager path needs more memory).
    """
    try:
        return fn(*args, **kwargs)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as exc:
        key: _Key = (student.device, kernel, student.dtype, teacher.dtype)
        verdict = _Verdict(False, f"launch error: {_describe(exc)}")
        with _lock:
            _verdicts[key] = verdict
            _seen.add(key)
        _warn(key, verdict)
        return None


def _verify_key(key: _Key, *, force: bool) -> _Verdict:
    with _lock:
        verdict = None if force else _verdicts.get(key)
        if verdict is not None:
            return verdict
        if _capturing(key[0]):
            raise RuntimeError(
                f"kdloss: the fused {key[1]} kernel has not been verified for {_dtype_name(key[2], key[3])} on "
                f"{key[0]} in this process, and its one-time self-check cannot run inside CUDA-graph capture "
                "(it synchronises with the host). Run one step before capturing (a warm-up, which "
                "torch.cuda.graph needs anyway), or call kdloss.kernels.verify() before capturing; "
                "KDLOSS_KERNELS=on (no check) or KDLOSS_KERNELS=off (no fused kernels) avoid the check"
            )
        verdict = _run_check(key)
        _verdicts[key] = verdict
        _seen.add(key)
    if not verdict.fused:
        _warn(key, verdict)
    return verdict


def _capturing(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    with torch.cuda.device(device):
        return bool(torch.cuda.is_current_stream_capturing())


def _run_check(key: _Key) -> _Verdict:
    device, kernel, sdt, tdt = key
    try:
        from kdloss.kernels import _selfcheck

        result = _selfcheck.run(kernel, device, sdt, tdt)
    except Exception as exc:  # a launch or compile error, or anything else: never into the user's step
        return _Verdict(False, f"the self-check could not run the kernel: {_describe(exc)}")
    if result.ok:
        return _Verdict(
            True,
            f"verified: the self-check passed ({result.cases}; largest error {result.worst:.2g} of its tolerance)",
            result.ms,
        )
    return _Verdict(False, f"the self-check failed: {result.detail}", result.ms)


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if len(text) > 400:
        text = text[:400] + " ..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _environment(device: torch.device) -> str:
    parts: list[str] = []
    try:
        if device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(device)
            parts.append(f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor})")
            parts.append(f"CUDA {torch.version.cuda}")
        else:
            parts.append(f"{device.type} (Triton interpreter)")
        parts.append(f"torch {torch.__version__}")
        parts.append(f"triton {getattr(importlib.import_module('triton'), '__version__', '?')}")
    except Exception as exc:  # the report must not fail
        parts.append(f"(environment not readable: {_describe(exc)})")
    return ", ".join(parts)


def _warn(key: _Key, verdict: _Verdict) -> None:
    device, kernel, sdt, tdt = key
    warnings.warn(
        f"kdloss: the fused {kernel} kernel is not used on {device} for {_dtype_name(sdt, tdt)}: "
        f"{verdict.reason}. The eager PyTorch path computes these losses instead for the rest of this "
        "process: the results are correct, only slower. Environment: "
        f"{_environment(device)}. Please report this to the kdloss issue tracker with this message; "
        "kdloss.kernels.status() lists every kernel's state, and KDLOSS_KERNELS=off skips the fused "
        "kernels and their self-check.",
        KernelFallbackWarning,
        stacklevel=2,
    )


# --------------------------------------------------------------------------- verify() and status()


def _dtype_name(sdt: torch.dtype, tdt: torch.dtype) -> str:
    s, t = str(sdt).removeprefix("torch."), str(tdt).removeprefix("torch.")
    return s if s == t else f"{s}/{t}"


def _resolve_device(device: torch.device | str | int | None) -> torch.device:
    if device is None:
        if not torch.cuda.is_available():
            raise ValueError("device: no CUDA device is available, and the fused kernels run on CUDA only")
        return torch.device("cuda", torch.cuda.current_device())
    dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if dev.type not in _DEVICE_TYPES:
        raise ValueError(f"device must be a CUDA device (the fused kernels run on CUDA only), got {str(dev)!r}")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def verify(
    device: torch.device | str | int | None = None,
    *,
    kernels: Sequence[KernelName] = KERNELS,
    dtypes: Sequence[torch.dtype | tuple[torch.dtype, torch.dtype]] = (torch.float32, torch.bfloat16),
    force: bool = False,
) -> list[KernelStatus]:
    """Run the self-check now (outside the training step, e.g. before CUDA-graph capture).

    For every kernel in ``kernels`` and every dtype in ``dtypes`` (a dtype, or a ``(student,
    teacher)`` pair of dtypes) on ``device`` (default: the current CUDA device), run the
    self-check unless a verdict is cached (``force=True`` runs it again) and return the keys'
    :class:`KernelStatus`. A failing kernel is reported by its status and one
    :class:`KernelFallbackWarning`, never by an exception. Runs whatever the mode.

    Raises:
        ValueError: for a device that is not CUDA (or none available), an unknown kernel, or a
            dtype the kernels do not take (they take float32, bfloat16, float16).
        RuntimeError: when called inside CUDA-graph capture.
    """
    dev = _resolve_device(device)
    for kernel in kernels:
        if kernel not in KERNELS:
            raise ValueError(f"kernels must hold names from {', '.join(map(repr, KERNELS))}, got {kernel!r}")
    pairs: list[tuple[torch.dtype, torch.dtype]] = []
    for d in dtypes:
        pair = d if isinstance(d, tuple) else (d, d)
        for x in pair:
            if x not in FUSED_DTYPES:
                raise ValueError(f"dtypes must be float32, bfloat16 or float16 (or pairs of them), got {x}")
        pairs.append(pair)
    keys: list[_Key] = [(dev, kernel, sdt, tdt) for kernel in kernels for sdt, tdt in pairs]
    if kernels_available():
        for key in keys:
            _verify_key(key, force=force)
    else:
        _seen.update(keys)
    wanted = set(keys)
    return [s for s in status() if any(_matches(s, k) for k in wanted)]


def _matches(s: KernelStatus, key: _Key) -> bool:
    return s.device == str(key[0]) and s.kernel == key[1] and s.dtype == _dtype_name(key[2], key[3])


def _off_reason() -> str:
    if not _enabled:
        return "switched off by kdloss.kernels.set_kernels_enabled(False)"
    if _mode_override == "off":
        return "switched off by kdloss.kernels.set_kernels_mode('off')"
    if os.environ.get(DEPRECATED_ENV, "").strip() not in ("", "0"):
        return f"switched off by {DEPRECATED_ENV} (deprecated; use {ENV}=off)"
    return f"switched off by {ENV}=off"


def status() -> list[KernelStatus]:
    """Every key a fused call has considered in this process: whether it takes the kernel, and why.

    Keys appear when a loss on CUDA (float32/bfloat16/float16) considers a fused kernel, or
    through :func:`verify`; CPU and float64 calls never do, so on a CPU-only machine the list is
    empty. The answer reflects the mode in force now.

    Example:
        >>> from kdloss.kernels import status
        >>> status()  # no CUDA call yet
        []
    """
    mode = kernels_mode()
    with _lock:
        keys = sorted(_seen | set(_verdicts), key=lambda k: (str(k[0]), k[1], str(k[2]), str(k[3])))
        verdicts = dict(_verdicts)
    out: list[KernelStatus] = []
    for key in keys:
        verdict = verdicts.get(key)
        check_ms = verdict.check_ms if verdict is not None else None
        if mode == "off":
            fused, reason = False, _off_reason()
        elif not kernels_available():
            fused, reason = False, "Triton cannot be imported"
        elif verdict is not None:
            fused, reason = verdict.fused, verdict.reason
        elif mode == "on":
            fused, reason = True, f"in use without the self-check ({ENV}=on)"
        else:
            fused, reason = False, "not checked yet: the self-check runs at the next fused call"
        out.append(KernelStatus(str(key[0]), key[1], _dtype_name(key[2], key[3]), fused, reason, check_ms))
    return out
