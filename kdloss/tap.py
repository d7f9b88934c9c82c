"""FeatureTap: capture intermediate activations of any ``nn.Module`` by submodule path."""

from __future__ import annotations

import difflib
import re
import warnings
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["FeatureTap", "unwrap_model"]

# Prefixes that wrappers insert into submodule names (FSDP1, activation checkpointing, compile).
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")

_COMPILE_ADVICE = (
    "enter the FeatureTap before the compiled model's first call (hooks added to a model that "
    "torch.compile has already run are not seen by the compiled code), or call torch._dynamo.reset() "
    "after entering it (this drops every compiled graph of the process)"
)


class _PathError(KeyError):
    """A ``KeyError`` whose message prints as written (``KeyError`` quotes it)."""

    def __str__(self) -> str:
        return str(self.args[0])


def _inner(model: nn.Module) -> nn.Module | None:
    """The module a known wrapper wraps, or ``None`` if ``model`` is not a wrapper."""
    inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
    if isinstance(inner, nn.Module):
        return inner
    # DDP, DataParallel, FSDP1 and FrozenTeacher all keep the wrapped model in `.module`.
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) or type(model).__name__ in (
        "FullyShardedDataParallel",
        "FrozenTeacher",
    ):
        inner = getattr(model, "module", None)
        if isinstance(inner, nn.Module):
            return inner
    return None


def _wrapper_chain(model: nn.Module) -> list[nn.Module]:
    chain = [model]
    while (inner := _inner(chain[-1])) is not None:
        chain.append(inner)
    return chain


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip ``torch.compile``, ``DistributedDataParallel``/``DataParallel``, FSDP and ``FrozenTeacher`` wrappers.

    Args:
        model: a model, possibly wrapped (several wrappers nest in any order).

    Returns:
        The innermost model, whose ``named_modules()`` names are the paths :class:`FeatureTap` uses.

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(2, 2)
        >>> unwrap_model(torch.nn.DataParallel(net)) is net
        True
    """
    return _wrapper_chain(model)[-1]


def _is_compiled(chain: list[nn.Module]) -> bool:
    return any(hasattr(m, "_orig_mod") or getattr(m, "_compiled_call_impl", None) is not None for m in chain)


def _clean_name(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """Translate a module-path glob: ``*`` and ``?`` stay within one dotted part, ``**`` crosses parts."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**.", i):  # zero or more whole parts
            out.append(r"(?:.*\.)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append(r"[^.]*")
        elif c == "?":
            out.append(r"[^.]")
        elif c == "[" and (end := pattern.find("]", i + 2)) != -1:
            body = pattern[i + 1 : end]
            if body.startswith("!"):
                body = "^" + body[1:]
            out.append(f"[{body}]")
            i = end + 1
            continue
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z")


def _map_tensors(obj: Any, fn: Any) -> Any:
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # NamedTuple
        return type(obj)(*(_map_tensors(o, fn) for o in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


class FeatureTap:
    """Capture the outputs of submodules, by path, for as long as the ``with`` block lasts.

    Behaviour:

    - **Paths** are names from ``model.named_modules()`` (``"layer3.1"``, ``"features.4"``) or
      glob patterns: ``*`` and ``?`` match within one dotted part (``"layer*.0"`` is
      ``layer1.0`` ... ``layer4.0``, not ``layer1.0.downsample.0``), ``**`` crosses parts
      (``"layer4.**.0"`` is ``layer4.0`` and ``layer4.0.downsample.0``),
      ``[01]`` is a character class. A path that matches nothing raises a ``KeyError`` listing
      the closest valid names. The empty path (the whole model) is refused: its output is what
      the model returns.
    - **Wrappers** (``torch.compile``, DDP, ``DataParallel``, FSDP, :class:`kdloss.FrozenTeacher`)
      are unwrapped, and their name prefixes (``module.``, ``_orig_mod.``,
      ``_fsdp_wrapped_module.``) are not part of the paths.
    - **Hooks** are registered on ``__enter__`` and always removed on ``__exit__``, also when the
      body raises; captured tensors are dropped then too, so read them inside the block. The
      model is never modified otherwise.
    - **Steps**: every call of the model (the object passed in, or the model it wraps) first
      drops what the previous call captured, so activations never pile up across iterations.
      :meth:`clear` does it by hand.
    - **Repeated calls**: a module called several times in one forward keeps every output, in
      order: ``tap[path]`` is the last, :meth:`calls` all of them, :attr:`order` the sequence of
      paths as their modules returned.
    - **detach**: ``True`` for a teacher (no graph is kept), ``False`` (default) for a student
      whose features feed a loss.
    - **In-place overwrites**: a module such as ``ReLU(inplace=True)`` that runs after the tapped
      one overwrites the captured tensor. ``clone=True`` stores a copy; otherwise reading a
      tensor that was modified in place after capture raises a ``RuntimeError`` that says so.
    - **torch.compile**: enter the tap *before* the compiled model's first call; then the hooks
      are traced into the graph and every step is captured (inside a compiled graph the
      version check cannot run, so captured tensors are always copies there). Hooks added
      *after* the first compiled call are silently skipped by torch's compiled code; the tap
      detects a compiled call that captured nothing and warns (``RuntimeWarning``), and reading
      a path then raises a ``KeyError`` with the same advice. See ``docs/featuretap.md``.

    Args:
        model: the model, or a wrapper of it (pass the object you call).
        paths: one path/pattern or a sequence of them.
        detach: store detached tensors.
        clone: store copies (protects against in-place modules that run later).

    Raises:
        TypeError: if ``model`` is not an ``nn.Module``.
        ValueError: for an empty ``paths`` or an empty path.
        KeyError: for a path that matches no submodule (the message lists close names).

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> with FeatureTap(net, "0") as tap:
        ...     out = net(torch.randn(3, 4))
        ...     hidden = tap["0"]
        >>> hidden.shape
        torch.Size([3, 8])
    """

    def __init__(
        self, model: nn.Module, paths: str | Sequence[str], *, detach: bool = False, clone: bool = False
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        patterns = [paths] if isinstance(paths, str) else list(paths)
        if not patterns:
            raise ValueError("paths must name at least one submodule, got an empty sequence")
        chain = _wrapper_chain(model)
        self._outer = model
        self.model = chain[-1]
        self.detach = detach
        self.clone = clone
        self.compiled = _is_compiled(chain)
        self._data_parallel = any(isinstance(m, nn.DataParallel) for m in chain)
        self.modules: dict[str, nn.Module] = self._resolve(patterns)
        self._handles: list[RemovableHandle] = []
        self._outputs: dict[str, list[Any]] = {}
        self._versions: dict[str, list[int]] = {}
        self._order: list[str] = []
        self._warned = False

    def _resolve(self, patterns: list[str]) -> dict[str, nn.Module]:
        named = {_clean_name(n): m for n, m in self.model.named_modules() if n}
        resolved: dict[str, nn.Module] = {}
        for pattern in patterns:
            if not isinstance(pattern, str) or not pattern.strip():
                raise ValueError(
                    f"each path must be a non-empty submodule name such as 'layer3.1', got {pattern!r} "
                    "(the empty path is the whole model: use its output directly)"
                )
            pattern = _clean_name(pattern.strip())
            hits = self._match(pattern, named)
            if not hits and pattern.startswith("module."):  # a DDP/DataParallel name, written with its prefix
                pattern = pattern.removeprefix("module.")
                hits = self._match(pattern, named)
            if not hits:
                close = difflib.get_close_matches(pattern, list(named), n=5, cutoff=0.5)
                if not close:
                    head = pattern.split(".")[0].rstrip("*?[")
                    close = [n for n in named if n.startswith(head)][:5] or list(named)[:5]
                raise _PathError(
                    f"path {pattern!r} matches no submodule of {type(self.model).__name__}; "
                    f"closest names: {', '.join(close) or '(the model has no submodules)'} "
                    "(see model.named_modules())"
                )
            for n in hits:
                resolved[n] = named[n]
        return resolved

    @staticmethod
    def _match(pattern: str, named: dict[str, nn.Module]) -> list[str]:
        if any(c in pattern for c in "*?["):
            rx = _glob_regex(pattern)
            return [n for n in named if rx.match(n)]
        return [pattern] if pattern in named else []

    # -- context manager ---------------------------------------------------------------------
    def __enter__(self) -> FeatureTap:
        self.attach()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.remove()

    def attach(self) -> None:
        """Register the hooks (done by ``__enter__``).

        Raises:
            RuntimeError: if the tap is already attached.
        """
        if self._handles:
            raise RuntimeError("FeatureTap is already attached; use it in one `with` block at a time")
        try:
            # Clear on a call of the outer object (its hooks run eagerly, outside any compiled
            # graph) and of the inner model (in case the user calls that one directly).
            # DataParallel copies the inner model's hooks into per-GPU replicas that run in threads:
            # there only the outer call may clear, or one replica would drop another's capture.
            if self._outer is not self.model:
                self._handles.append(self._outer.register_forward_pre_hook(self._on_root_call))
            if not self._data_parallel:
                self._handles.append(self.model.register_forward_pre_hook(self._on_root_call))
            for path, module in self.modules.items():
                self._handles.append(module.register_forward_hook(self._make_hook(path)))
            if self.compiled and self._outer is not self.model:
                self._handles.append(self._outer.register_forward_hook(self._after_compiled_call))
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        """Remove every hook and drop every captured tensor (done by ``__exit__``)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()

    @property
    def attached(self) -> bool:
        """Whether the hooks are registered."""
        return bool(self._handles)

    # -- capture -------------------------------------------------------------------------------
    def _on_root_call(self, module: nn.Module, args: Any) -> None:
        self.clear()

    def _after_compiled_call(self, module: nn.Module, args: Any, output: Any) -> None:
        if not self._order and not self._warned:
            self._warned = True
            warnings.warn(
                f"FeatureTap captured nothing during a call of the compiled {type(self.model).__name__} "
                f"(tapped paths: {', '.join(self.modules)}): {_COMPILE_ADVICE}",
                RuntimeWarning,
                stacklevel=2,
            )

    def _make_hook(self, path: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            stored = output
            compiling = torch.compiler.is_compiling()
            if self.detach:
                stored = _map_tensors(stored, Tensor.detach)
            if self.clone or compiling:
                stored = _map_tensors(stored, Tensor.clone)
            self._outputs.setdefault(path, []).append(stored)
            version = stored._version if isinstance(stored, Tensor) and not (self.clone or compiling) else -1
            self._versions.setdefault(path, []).append(version)
            self._order.append(path)

        return hook

    def clear(self) -> None:
        """Drop everything captured so far."""
        self._outputs.clear()
        self._versions.clear()
        self._order.clear()

    # -- access --------------------------------------------------------------------------------
    def _checked(self, path: str, index: int) -> Any:
        if path not in self.modules:
            raise _PathError(f"{path!r} is not tapped; tapped paths: {', '.join(self.modules)}")
        outs = self._outputs.get(path)
        if not outs:
            if not self.attached:
                why = "the tap is not attached: captured tensors are dropped when the `with` block exits"
            elif self.compiled and not self._order:
                why = f"nothing was captured in the compiled model: {_COMPILE_ADVICE}"
            else:
                why = "run the model's forward inside the `with FeatureTap(...)` block first"
            raise _PathError(f"{path!r} has not been called since the last clear: {why}")
        out = outs[index]
        version = self._versions[path][index]
        if isinstance(out, Tensor) and version >= 0 and out._version != version:
            raise RuntimeError(
                f"the output captured at {path!r} was modified in place after capture (for example by "
                "a ReLU(inplace=True) that follows it); create the tap with clone=True"
            )
        return out

    def get(self, path: str) -> Any:
        """The last output of ``path`` in this step, whatever its type (tensor, tuple, ...).

        Raises:
            KeyError: if ``path`` is not tapped or was not called in this step.
            RuntimeError: if the captured tensor was modified in place after capture.
        """
        return self._checked(path, -1)

    def __getitem__(self, path: str) -> Tensor:
        """The last output of ``path`` in this step, which must be a tensor."""
        out = self.get(path)
        if not isinstance(out, Tensor):
            raise TypeError(f"the output of {path!r} is a {type(out).__name__}, not a tensor; use tap.get({path!r})")
        return out

    def calls(self, path: str) -> list[Any]:
        """Every output of ``path`` in this step, in call order."""
        return [self._checked(path, i) for i in range(len(self._outputs.get(path, ())))]

    def __contains__(self, path: object) -> bool:
        return path in self._outputs

    def __iter__(self) -> Iterator[str]:
        return iter(self.modules)

    def __len__(self) -> int:
        return len(self.modules)

    @property
    def features(self) -> dict[str, Any]:
        """The last output of every tapped path called in this step."""
        return {p: self.get(p) for p in self.modules if p in self._outputs}

    @property
    def order(self) -> list[str]:
        """Tapped paths in the order their modules returned in this step (repeats included)."""
        return list(self._order)

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        return (
            f"FeatureTap({type(self.model).__name__}, paths={list(self.modules)}, "
            f"detach={self.detach}, clone={self.clone}, {state})"
        )
