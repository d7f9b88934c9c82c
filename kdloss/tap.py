"""FeatureTap: capture intermediate activations of any ``nn.Module`` by submodule path."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["FeatureTap", "unwrap_model"]

# Prefixes that wrappers insert into submodule names (FSDP1, activation checkpointing, compile).
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip ``torch.compile``, ``DistributedDataParallel``/``DataParallel`` and FSDP wrappers.

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(2, 2)
        >>> unwrap_model(torch.nn.DataParallel(net)) is net
        True
    """
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
        if (
            isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel))
            or type(model).__name__ == "FullyShardedDataParallel"
        ):
            inner = getattr(model, "module", None)
            if isinstance(inner, nn.Module):
                model = inner
                continue
        return model


def _clean_name(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


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

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> with FeatureTap(net, "0") as tap:
    ...     out = net(torch.randn(3, 4))
    ...     hidden = tap["0"]
    >>> hidden.shape
    torch.Size([3, 8])

    Behaviour:

    - **Paths** are names from ``model.named_modules()`` (``"layer3.1"``, ``"features.4"``) or
      glob patterns (``"layer*.1"``, ``"blocks.*"``). A path that matches nothing raises a
      ``KeyError`` listing the closest valid names. The empty path (the whole model) is refused:
      its output is what the model returns.
    - **Wrappers** (``torch.compile``, DDP, ``DataParallel``, FSDP) are unwrapped, and their
      name prefixes (``module.``, ``_orig_mod.``, ``_fsdp_wrapped_module.``) are not part of
      the paths.
    - **Hooks** are registered on ``__enter__`` and always removed on ``__exit__``, also when the
      body raises; captured tensors are dropped then too. The model is never modified otherwise.
    - **Steps**: every forward call of the (unwrapped) root model clears what the previous call
      captured, so activations never pile up across iterations. :meth:`clear` does it by hand.
    - **Repeated calls**: a module called several times in one forward keeps every output, in
      order: ``tap[path]`` is the last, :meth:`calls` all of them, :attr:`order` the sequence of
      paths as they fired.
    - **detach**: ``True`` for a teacher (no graph is kept), ``False`` (default) for a student
      whose features feed a loss.
    - **In-place overwrites**: a module such as ``ReLU(inplace=True)`` that runs after the tapped
      one can overwrite the captured tensor. ``clone=True`` stores a copy; otherwise reading a
      tensor that was modified in place after capture raises a ``RuntimeError`` that says so.
    - **torch.compile**: enter the tap before the compiled model's first call (or call
      ``torch._dynamo.reset()`` after entering): hooks added after a compiled graph was built
      are not seen by that graph. Tested in ``tests/test_tap.py``.

    Args:
        model: the model (or a wrapper of it).
        paths: one path/pattern or a sequence of them.
        detach: store detached tensors.
        clone: store copies (protects against in-place modules that run later).
    """

    def __init__(
        self, model: nn.Module, paths: str | Sequence[str], *, detach: bool = False, clone: bool = False
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        patterns = [paths] if isinstance(paths, str) else list(paths)
        if not patterns:
            raise ValueError("paths must name at least one submodule, got an empty sequence")
        self.model = unwrap_model(model)
        self.detach = detach
        self.clone = clone
        self.modules: dict[str, nn.Module] = self._resolve(patterns)
        self._handles: list[RemovableHandle] = []
        self._outputs: dict[str, list[Any]] = {}
        self._versions: dict[str, list[int]] = {}
        self._order: list[str] = []

    def _resolve(self, patterns: list[str]) -> dict[str, nn.Module]:
        named = {_clean_name(n): m for n, m in self.model.named_modules() if n}
        resolved: dict[str, nn.Module] = {}
        for pattern in patterns:
            if not isinstance(pattern, str) or not pattern.strip():
                raise ValueError(
                    f"each path must be a non-empty submodule name such as 'layer3.1', got {pattern!r} "
                    "(the empty path is the whole model: use its output directly)"
                )
            pattern = _clean_name(pattern.removeprefix("module."))
            if any(c in pattern for c in "*?["):
                hits = [n for n in named if fnmatch.fnmatchcase(n, pattern)]
            else:
                hits = [pattern] if pattern in named else []
            if not hits:
                close = difflib.get_close_matches(pattern, list(named), n=5, cutoff=0.5)
                if not close:
                    head = pattern.split(".")[0]
                    close = [n for n in named if n.startswith(head)][:5] or list(named)[:5]
                raise KeyError(
                    f"path {pattern!r} matches no submodule of {type(self.model).__name__}; "
                    f"closest names: {', '.join(close)} (see model.named_modules())"
                )
            for n in hits:
                resolved[n] = named[n]
        return resolved

    # -- context manager ---------------------------------------------------------------------
    def __enter__(self) -> FeatureTap:
        self.attach()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.remove()

    def attach(self) -> None:
        """Register the hooks (done by ``__enter__``). Attaching twice is an error."""
        if self._handles:
            raise RuntimeError("FeatureTap is already attached; use it in one `with` block at a time")
        try:
            self._handles.append(self.model.register_forward_pre_hook(self._on_root_call))
            for path, module in self.modules.items():
                self._handles.append(module.register_forward_hook(self._make_hook(path)))
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

    def _make_hook(self, path: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            stored = output
            if self.detach:
                stored = _map_tensors(stored, Tensor.detach)
            if self.clone:
                stored = _map_tensors(stored, Tensor.clone)
            self._outputs.setdefault(path, []).append(stored)
            version = stored._version if isinstance(stored, Tensor) and not self.clone else -1
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
            raise KeyError(f"{path!r} is not tapped; tapped paths: {', '.join(self.modules)}")
        outs = self._outputs.get(path)
        if not outs:
            raise KeyError(
                f"{path!r} has not been called since the last clear: run the model's forward inside the "
                "`with FeatureTap(...)` block first"
            )
        out = outs[index]
        version = self._versions[path][index]
        if isinstance(out, Tensor) and version >= 0 and out._version != version:
            raise RuntimeError(
                f"the output captured at {path!r} was modified in place after capture (for example by "
                "a ReLU(inplace=True) that follows it); create the tap with clone=True"
            )
        return out

    def get(self, path: str) -> Any:
        """The last output of ``path`` in this step, whatever its type (tensor, tuple, ...)."""
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
