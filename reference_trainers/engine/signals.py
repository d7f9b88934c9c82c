"""Stopping on purpose: :class:`StopRequested`, and SIGINT / SIGTERM honoured at the next safe point."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

from reference_trainers.engine.context import Context
from reference_trainers.errors import TrainerError

__all__ = ["STOP", "StopRequested", "StopSignals", "guard", "stop_signals", "why"]


class StopRequested(TrainerError):
    """A stop on purpose: after ``TrainConfig.stop_after_epoch``/``stop_after_step`` (its checkpoint is
    written) or on SIGINT / SIGTERM (see :func:`stop_signals`); the CLI exits with code 3."""


class StopSignals:
    """SIGINT / SIGTERM: the first asks the work in progress to stop at its next safe point, a second stops at once.

    One per process (:data:`STOP`). Its handlers are installed while a guard is held
    (:func:`stop_signals`, which the CLI holds around a whole recipe, or the guard that
    :func:`train_run`, :func:`teacher_cache` and :func:`write_reports` each hold); the outermost
    guard installs them and clears any earlier request, and its exit restores the previous
    handlers. Installed only in the main thread of a single process (under ``torchrun`` the
    launcher handles signals). A request stays set until the outermost guard exits, so that
    every later phase (the next run, the teacher cache, the reports) stops as well.

    The safe points: after the training step in progress (a mid-epoch checkpoint is written),
    after an epoch, before a run starts, after a run's last epoch (its final checkpoint is
    written), between batches of the teacher cache, and between the report files. Each raises
    :class:`StopRequested` (the CLI's exit code 3). A second signal raises it at once, wherever
    the program is (the last checkpoint written is kept; files are written atomically).
    """

    _SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested: str | None = None  # the name of the signal that asked to stop
        self._previous: dict[int, Any] = {}
        self._depth = 0

    def enter(self, enabled: bool = True) -> bool:
        """Hold a guard; install the handlers if this is the outermost one. Returns whether one is held."""
        if not enabled or threading.current_thread() is not threading.main_thread():
            return False
        if self._depth == 0:
            self.requested = None
            for sig in self._SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        self._depth += 1
        return True

    def exit(self) -> None:
        self._depth -= 1
        if self._depth == 0:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
            self._previous = {}
            self.requested = None  # honoured (or not) by now; no guard held, nothing to stop

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None:
            raise StopRequested(
                f"a second {name}: stopped at once; the last checkpoint written is kept, continue with --resume"
            )
        self.requested = name
        print(
            f"{name}: stopping at the next safe point (after the step in progress, with a checkpoint); "
            "send it again to stop at once",
            file=sys.stderr,
            flush=True,
        )

    def check(self, where: str, then: str = "continue with --resume") -> None:
        """Raise :class:`StopRequested` if a stop was asked for; ``where`` completes "stopped ..."."""
        if self.requested is not None:
            raise StopRequested(f"stopped {where} ({self.requested}); {then}")


STOP = StopSignals()


def why(signals: StopSignals) -> str:
    return f" ({signals.requested})" if signals.requested is not None else ""


@contextlib.contextmanager
def stop_signals(enabled: bool = True) -> Iterator[None]:
    """Honour SIGINT / SIGTERM for the whole block (a recipe): see :class:`StopSignals`.

    The CLI holds it around a recipe, so that a signal between runs, during the teacher cache or
    while the reports are written stops the program at the next safe point with exit code 3;
    a request that arrives after the last safe point is honoured when the block ends.

    Raises:
        StopRequested: at the end of the block, if a stop was asked for and nothing raised it yet.
    """
    held = STOP.enter(enabled)
    try:
        yield
        if held:
            STOP.check("after the last step, with every file written", "nothing is left to resume")
    finally:
        if held:
            STOP.exit()


@contextlib.contextmanager
def guard(ctx: Context) -> Iterator[None]:
    held = STOP.enter(ctx.config.handle_signals and not ctx.distributed)
    try:
        yield
    finally:
        if held:
            STOP.exit()
