"""Fault injection for ``tests/test_trainers_kill.py``: run the CLI in a forked child, SIGKILL it at an event.

The events are counted in the child: ``step`` (after an optimiser step), ``write`` (half-way through
writing a file's bytes in :func:`reference_trainers.engine.atomic_write_bytes`), ``fsync`` (before an
``os.fsync``: of a temp file, or of its directory after the rename) and ``replace`` (before the
``os.replace`` that puts a complete temp file in place). :func:`child` kills itself with SIGKILL at
the ``at``-th occurrence of ``event``, or, with no event, runs to the end and records the counts.

The test starts children through a ``forkserver`` that imported this module (and so torch,
torchvision, matplotlib and the trainers) once: each child is a fork of that server, which never ran
a torch operation, so no thread pool is copied into a child.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections import Counter
from collections.abc import Sequence
from typing import Any

import matplotlib
import torch
import torchvision  # noqa: F401  # imported here once, for the children
from torch.optim.optimizer import register_optimizer_step_post_hook

from reference_trainers.__main__ import main

matplotlib.use("Agg")
import matplotlib.pyplot

EVENTS = ("step", "write", "fsync", "replace")


class _HalfWriteKill:
    """A binary file whose ``write`` writes half the bytes, flushes them, then reports a ``write`` event."""

    def __init__(self, f: Any, event: Any) -> None:
        self._f, self._event = f, event

    def write(self, data: bytes) -> int:
        half = len(data) // 2
        self._f.write(data[:half])
        self._f.flush()
        self._event("write")
        return int(self._f.write(data[half:])) + half

    def __enter__(self) -> _HalfWriteKill:
        self._f.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.__exit__(*exc)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def child(argv: Sequence[str], event: str | None, at: int, counts_path: str, log_path: str) -> None:
    """Run ``python -m reference_trainers *argv``; SIGKILL this process at the ``at``-th ``event``."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    torch.set_num_threads(1)
    counts: Counter[str] = Counter()

    def hit(name: str) -> None:
        counts[name] += 1
        if name == event and counts[name] == at:
            sys.stdout.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    register_optimizer_step_post_hook(lambda *_: hit("step"))
    real_fdopen, real_fsync, real_replace = os.fdopen, os.fsync, os.replace

    def fdopen(fd: int, *args: Any, **kw: Any) -> Any:
        f = real_fdopen(fd, *args, **kw)
        return _HalfWriteKill(f, hit) if sys._getframe(1).f_code.co_name == "atomic_write_bytes" else f

    def fsync(fd: int) -> None:
        hit("fsync")
        real_fsync(fd)

    def replace(src: Any, dst: Any, *args: Any, **kw: Any) -> None:
        hit("replace")
        real_replace(src, dst, *args, **kw)

    os.fdopen, os.fsync, os.replace = fdopen, fsync, replace  # type: ignore[assignment]
    try:
        rc = main(list(argv))
    except SystemExit as e:
        rc = int(e.code or 0)
    with open(counts_path, "w") as f:
        json.dump(dict(counts), f)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
