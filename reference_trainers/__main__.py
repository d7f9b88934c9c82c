"""The reference trainers' command line: ``python -m reference_trainers <recipe> [options]``.

``python -m reference_trainers --help`` lists the recipes, ``... <recipe> --help`` their options
with their defaults. Exit codes: 0 success; 2 bad usage or bad input (unknown recipe or option,
a value out of range, missing data root, an output folder that is not writable or already holds
checkpoints, a missing extra, corrupt image, unusable or unsafe checkpoint), with a one-line
message on stderr; 3 a run stopped on purpose (Ctrl-C / SIGTERM, or ``--stop-after-epoch``;
wherever it arrives; continue it with ``--resume``). Under ``torchrun --nproc_per_node N -m reference_trainers ...``
every process runs the same command.

Before any data is read or any model is built, every option is checked (by its argparse
``type`` and by the recipe's ``check(args)``), then the installed extras, the device and the
output folder (:func:`reference_trainers.recipes.common.check_output`).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import torch

from reference_trainers.engine import StopRequested, stop_signals, teardown
from reference_trainers.errors import TrainerError
from reference_trainers.recipes import RECIPES
from reference_trainers.recipes.common import (
    add_common_arguments,
    check_device,
    check_extras,
    check_output,
    default_threads,
    prepare_output,
)

# A write that fails for lack of room or rights is the user's environment, not a bug: one line, exit 2.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line (the usage is one ``--help`` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: one sub-command per recipe."""
    p = _Parser(
        prog="python -m reference_trainers",
        description="Reproduce documented knowledge-distillation experiments with kdloss.",
    )
    sub = p.add_subparsers(dest="recipe", metavar="<recipe>", title="recipes")
    sub.required = True
    for name, mod in RECIPES.items():
        sp = sub.add_parser(name, help=mod.HELP, description=(mod.__doc__ or mod.HELP).strip().split("\n\n")[0])
        add_common_arguments(sp)
        mod.add_arguments(sp)
        sp.set_defaults(func=mod.run, check=mod.check)
    return p


def _on_cpu(device: str) -> bool:
    return device == "cpu" or (device == "auto" and not torch.cuda.is_available())


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, check everything, run the recipe; input errors become a message and exit code 2."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.smoke and not any(a == "--epochs" or a.startswith("--epochs=") for a in argv):
        args.epochs = 1
    if args.out is None:
        args.out = Path("runs") / args.recipe
    try:
        args.check(args)  # the recipe's own options (methods, phases, paths, data options)
        check_extras(args)
        check_device(args)
        found = check_output(args)
    except TrainerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    elif _on_cpu(args.device):
        threads, why = default_threads()
        torch.set_num_threads(threads)
        print(f"CPU threads: {threads} ({why}; --threads N to choose)", file=sys.stderr)
    prepare_output(args, found)
    clean = False
    try:
        with stop_signals(enabled=int(os.environ.get("WORLD_SIZE", "1")) <= 1):  # torchrun handles its own
            rc: int = args.func(args)
        clean = rc == 0
    except StopRequested as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 3
    except TrainerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in _WRITE_ERRNOS:
            raise
        where = f" ({e.filename})" if e.filename else ""
        print(
            f"error: cannot write to --out {str(args.out)!r}: {e.strerror or e}{where}; free some space or choose "
            "another --out, then continue with --resume",
            file=sys.stderr,
        )
        return 2
    finally:
        teardown(clean=clean)  # leave the torchrun process group before the interpreter shuts down
    return rc


if __name__ == "__main__":
    sys.exit(main())
