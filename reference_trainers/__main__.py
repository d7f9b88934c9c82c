"""The reference trainers' command line: ``python -m reference_trainers <recipe> [options]``.

``python -m reference_trainers --help`` lists the recipes, ``... <recipe> --help`` their options.
Exit codes: 0 success; 2 bad usage or bad input (unknown recipe or option, missing data root,
corrupt image, unusable, unsafe or damaged checkpoint, an output that cannot be written), with a
one-line message on stderr; 3 stopped on purpose by ``--stop-after-epoch``/``--stop-after-step``
or by SIGINT / SIGTERM, wherever it arrives (continue with ``--resume``). Under
``torchrun --nproc_per_node N -m reference_trainers ...`` every process runs the same command.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import torch

from reference_trainers.engine import StopRequested, stop_signals
from reference_trainers.errors import TrainerError
from reference_trainers.recipes import RECIPES
from reference_trainers.recipes.common import add_common_arguments


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: one sub-command per recipe."""
    p = argparse.ArgumentParser(
        prog="python -m reference_trainers",
        description="Reproduce documented knowledge-distillation experiments with kdloss.",
    )
    sub = p.add_subparsers(dest="recipe", metavar="<recipe>", title="recipes")
    sub.required = True
    for name, mod in RECIPES.items():
        sp = sub.add_parser(name, help=mod.HELP, description=(mod.__doc__ or mod.HELP).strip().split("\n\n")[0])
        add_common_arguments(sp)
        mod.add_arguments(sp)
        sp.set_defaults(func=mod.run)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run the recipe, turn input errors into a message and exit code 2."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.smoke and not any(a == "--epochs" or a.startswith("--epochs=") for a in argv):
        args.epochs = 1
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        with stop_signals(enabled=int(os.environ.get("WORLD_SIZE", "1")) <= 1):  # torchrun handles its own
            rc: int = args.func(args)
    except StopRequested as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 3
    except TrainerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return rc


if __name__ == "__main__":
    sys.exit(main())
