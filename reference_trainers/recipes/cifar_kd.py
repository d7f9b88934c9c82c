"""The loop shared by the CIFAR distillation recipes (``benchmark-cifar100``, ``dih``).

Per recipe: load CIFAR (crop + flip augmentation on the device), get the teacher (a checkpoint
from ``--teacher-checkpoint``, or trained here with cross-entropy once, with the first seed, and
reused by every student), then for every seed and every ``--method`` build the method from
:data:`reference_trainers.methods.METHODS` and train it with SGD + multi-step decay through
the engine. Milestones scale with ``--epochs`` (``round(m * epochs / default_epochs)``), so a
shortened run keeps the schedule's shape; at the default epochs they are the published ones.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from reference_trainers.data import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD
from reference_trainers.engine import (
    DistillStep,
    RunData,
    RunResult,
    RunSpec,
    atomic_write_bytes,
    checkpoint_digest,
    setup,
    summarise,
    train_run,
)
from reference_trainers.errors import CheckpointError, TrainerError
from reference_trainers.methods import (
    METHODS,
    AttentionOptions,
    CEStep,
    CohortOptions,
    ContrastiveOptions,
    HintOptions,
    LogitOptions,
    MethodSetup,
    get_method,
)
from reference_trainers.models import MODEL_NAMES, build_model
from reference_trainers.recipes.common import (
    check_data_arguments,
    config_from_args,
    existing_file,
    finish,
    load_splits,
    nonnegative_float,
    positive_float,
    positive_int,
    run_data,
    unit_float,
)

__all__ = [
    "CifarDefaults",
    "add_cifar_arguments",
    "add_crd_arguments",
    "check_cifar",
    "contrastive_options",
    "crd_options",
    "load_teacher_weights",
    "run_cifar_kd",
    "write_comparison",
]

_CRD = ContrastiveOptions()  # the defaults the options below show


@dataclass(frozen=True)
class CifarDefaults:
    """A recipe's published hyper-parameters."""

    teacher: str
    student: str
    methods: tuple[str, ...]
    seeds: tuple[int, ...]
    epochs: int
    lr: float
    milestones: tuple[int, ...]
    gamma: float
    weight_decay: float
    batch_size: int
    temperature: float
    ce_weight: float
    kd_weight: float
    dataset: str


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def add_cifar_arguments(p: argparse.ArgumentParser, d: CifarDefaults) -> None:
    """The options of a CIFAR distillation recipe, with ``d``'s defaults (shown by ``--help``)."""
    g = p.add_argument_group("distillation")
    g.add_argument(
        "--teacher", default=d.teacher, choices=MODEL_NAMES, metavar="MODEL", help="teacher (default: %(default)s)"
    )
    g.add_argument(
        "--student", default=d.student, choices=MODEL_NAMES, metavar="MODEL", help="student (default: %(default)s)"
    )
    g.add_argument(
        "--method",
        "--methods",
        dest="methods",
        type=_csv,
        default=",".join(d.methods),
        help=f"comma-separated methods among {', '.join(METHODS)} (default: {','.join(d.methods)})",
    )
    g.add_argument(
        "--teacher-checkpoint", type=existing_file, default=None, help="teacher weights (skip teacher training)"
    )
    g.add_argument(
        "--teacher-epochs", type=positive_int, default=None, help="epochs of teacher training (default: --epochs)"
    )
    g.add_argument("--lr", type=positive_float, default=d.lr, help="SGD learning rate (default: %(default)s)")
    g.add_argument("--weight-decay", type=nonnegative_float, default=d.weight_decay, help="(default: %(default)s)")
    g.add_argument(
        "--temperature", type=positive_float, default=d.temperature, help="KD temperature (default: %(default)s)"
    )
    g.add_argument(
        "--ce-weight", type=nonnegative_float, default=d.ce_weight, help="CE weight of kd (default: %(default)s)"
    )
    g.add_argument(
        "--kd-weight", type=nonnegative_float, default=d.kd_weight, help="KL weight of kd (default: %(default)s)"
    )
    g.add_argument(
        "--hint-weight",
        type=nonnegative_float,
        default=HintOptions.weight,
        help="fitnet's hint weight, the benchmark's (default: %(default)s)",
    )
    g.add_argument(
        "--at-beta", type=nonnegative_float, default=AttentionOptions.beta, help="at's beta (default: %(default)s)"
    )
    g.add_argument(
        "--fitnet-stage1-epochs",
        type=positive_int,
        default=HintOptions.stage1_epochs,
        help="fitnet2's hint pre-training epochs (default: %(default)s)",
    )
    g.add_argument(
        "--init-epochs",
        type=positive_int,
        default=MethodSetup.init_epochs,
        help="ab/fsp init and ft paraphraser epochs (default: %(default)s)",
    )
    g.add_argument(
        "--head-epochs",
        type=positive_int,
        default=CohortOptions.head_epochs,
        help="dih's head fine-tuning epochs, Adam 1e-3 (default: %(default)s)",
    )
    add_crd_arguments(p)
    p.set_defaults(
        epochs=d.epochs, batch_size=d.batch_size, seeds=",".join(map(str, d.seeds)), dataset=d.dataset, val_size=5000
    )


def add_crd_arguments(p: argparse.ArgumentParser) -> None:
    """The ``crd`` and ``takd`` options of the CIFAR recipes (defaults: ``ContrastiveOptions``'s)."""
    g = p.add_argument_group("crd / takd")
    g.add_argument(
        "--crd-weight", type=nonnegative_float, default=None, help="CRD weight beta (benchmark 0.8, dih 0.03)"
    )
    g.add_argument(
        "--crd-ce-weight", type=nonnegative_float, default=None, help="crd's CE weight (benchmark 1, dih --ce-weight)"
    )
    g.add_argument(
        "--crd-kd-weight", type=nonnegative_float, default=None, help="crd's KD weight (benchmark 0, dih --kd-weight)"
    )
    g.add_argument(
        "--crd-feat-dim", type=positive_int, default=_CRD.feat_dim, help="CRD embedding width (default: %(default)s)"
    )
    g.add_argument(
        "--crd-nce-k",
        type=positive_int,
        default=_CRD.n_negatives,
        help="CRD negatives per sample (default: %(default)s)",
    )
    g.add_argument(
        "--crd-nce-t", type=positive_float, default=_CRD.temperature, help="CRD temperature (default: %(default)s)"
    )
    g.add_argument(
        "--crd-nce-m", type=unit_float, default=_CRD.momentum, help="CRD bank momentum (default: %(default)s)"
    )
    g.add_argument(
        "--crd-negatives",
        default=_CRD.negatives,
        choices=("class", "uniform"),
        help="CRD negatives: other classes, RepDistiller's 'exact' (class), or the whole bank (uniform) "
        "(default: %(default)s)",
    )
    g.add_argument("--ta", default=None, choices=MODEL_NAMES, metavar="MODEL", help="takd's teacher assistant")
    g.add_argument("--ta-epochs", type=positive_int, default=None, help="takd's assistant epochs (default: --epochs)")


def contrastive_options(args: argparse.Namespace, recipe: str, *, train: Any) -> ContrastiveOptions:
    """``crd``'s options from the parsed arguments: ``train`` is the training batch source, whose
    ``num_samples`` sizes the banks and whose ``labels`` (when it has them) drive the class-aware negatives."""
    labels = getattr(train, "labels", None)
    return ContrastiveOptions(
        n_data=int(train.num_samples),
        labels=labels.detach().cpu() if isinstance(labels, Tensor) else None,
        negatives=args.crd_negatives,
        weight=args.crd_weight,
        ce_weight=args.crd_ce_weight,
        kd_weight=args.crd_kd_weight,
        preset=recipe,
        feat_dim=args.crd_feat_dim,
        n_negatives=args.crd_nce_k,
        temperature=args.crd_nce_t,
        momentum=args.crd_nce_m,
    )


def crd_options(args: argparse.Namespace, recipe: str, *, train: Any, epochs: int) -> dict[str, Any]:
    """The options of ``crd`` and ``takd`` as the untyped mapping of earlier versions (deprecated:
    :func:`contrastive_options` and :class:`~reference_trainers.methods.LogitOptions`)."""
    labels = getattr(train, "labels", None)
    return {
        "recipe": recipe,
        "n_data": int(train.num_samples),
        "crd_labels": labels.detach().cpu() if isinstance(labels, Tensor) else None,
        "crd_negatives": args.crd_negatives,
        "epochs": epochs,
        "crd_weight": args.crd_weight,
        "crd_ce_weight": args.crd_ce_weight,
        "crd_kd_weight": args.crd_kd_weight,
        "crd_feat_dim": args.crd_feat_dim,
        "crd_nce_k": args.crd_nce_k,
        "crd_nce_t": args.crd_nce_t,
        "crd_nce_m": args.crd_nce_m,
        "ta": args.ta,
        "ta_epochs": args.ta_epochs if not args.smoke else 1,
    }


def check_cifar(args: argparse.Namespace, recipe: str) -> None:
    """The options of a CIFAR recipe, before anything runs: every method known and available, what
    they need (``takd``: ``--ta``), and the data options (``--smoke`` without ``--data-root`` runs on
    the embedded subset, and says so)."""
    if not args.methods:
        raise TrainerError("--method needs at least one method")
    for m in args.methods:
        get_method(m)  # an unknown or unavailable method: a TrainerError naming the available ones
    if "takd" in args.methods and not args.ta:
        raise TrainerError("method 'takd' needs a teacher assistant: pass --ta MODEL (e.g. --ta resnet20)")
    check_data_arguments(args, recipe)


def load_teacher_weights(model: nn.Module, path: Path) -> None:
    """Load teacher weights: a state dict, the community benchmark's ``{"model": state_dict}``, or an
    engine checkpoint (``{"model": step state dict}`` with ``student.`` keys). ``weights_only`` only;
    a file with a ``"checksum"`` (the engine's checkpoints) is verified against it.

    Raises:
        CheckpointError: a missing, unsafe, unreadable or damaged file, or weights of another model.
    """
    if not path.is_file():
        raise CheckpointError(f"teacher checkpoint {str(path)!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unsafe pickle or a corrupt file: refused, never loaded unsafely
        raise CheckpointError(f"refusing teacher checkpoint {str(path)!r}: {str(e).splitlines()[0]}") from e
    if isinstance(obj, dict) and "checksum" in obj and checkpoint_digest(obj) != obj["checksum"]:
        raise CheckpointError(
            f"teacher checkpoint {str(path)!r} is damaged: its content does not match its checksum; it was not used"
        )
    state: Any = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"teacher checkpoint {str(path)!r} holds no state dict")
    if any(k.startswith("student.") for k in state):
        state = {k[len("student.") :]: v for k, v in state.items() if k.startswith("student.")}
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(
            f"teacher checkpoint {str(path)!r} does not fit {type(model).__name__}: {str(e).splitlines()[0]}"
        ) from e


def write_comparison(path: Path, results: Sequence[RunResult], published: dict[str, float], teacher: str) -> None:
    """``comparison.md``: published top-1 (best test epoch) next to ours (selected on val, and last epoch)."""
    rows = {r["method"]: r for r in summarise(results)}
    lines = [
        "| method | published (best test epoch) | ours: test, selected on val | ours: test, last epoch |",
        "|---|---|---|---|",
    ]
    for method, value in published.items():
        ours = rows.get(f"teacher-{teacher}" if method == "teacher" else method)

        def pct(key: str, row: dict[str, Any] | None = ours) -> str:
            if row is None or row[f"{key}_mean"] is None:
                return "not run"
            sd = row[f"{key}_sd"]
            spread = "" if sd is None else f" ± {100 * sd:.2f}"  # one seed has no spread to show
            return f"{100 * row[f'{key}_mean']:.2f}{spread} (n={row['n']})"

        lines.append(f"| {method} | {value:.2f} | {pct('test_selected')} | {pct('test_last')} |")
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())


class TrainBatches:
    """Re-iterable ``(images, labels)`` of the training split, augmented and normalised on the device
    (a new epoch's order and augmentation on every iteration), at most ``max_batches`` per pass."""

    def __init__(self, data: RunData, seed: int, max_batches: int | None) -> None:
        self.data, self.seed, self.max_batches = data, seed, max_batches
        self.epoch = 0

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        gen: torch.Generator | None = None
        for i, b in enumerate(self.data.train.batches(self.epoch)):
            if self.max_batches is not None and i >= self.max_batches:
                break
            if gen is None:
                gen = torch.Generator(device=b.images.device).manual_seed(self.seed * 7919 + self.epoch)
            yield self.data.train_augment(b.images, gen), b.labels
        self.epoch += 1


def _scaled(milestones: Sequence[int], epochs: int, default_epochs: int) -> list[int]:
    return [max(1, round(m * epochs / default_epochs)) for m in milestones]


def run_cifar_kd(args: argparse.Namespace, recipe: str, d: CifarDefaults, meta: dict[str, Any]) -> int:
    """Train the teacher (or load it) and every (method, seed) student; write the reports."""
    epochs = args.epochs
    t_epochs = args.teacher_epochs or epochs
    ctx = setup(config_from_args(args, recipe))
    splits = load_splits(args, ctx)
    n = splits.num_classes
    mean, std = (CIFAR100_MEAN, CIFAR100_STD) if n == 100 else (CIFAR10_MEAN, CIFAR10_STD)
    milestones = _scaled(d.milestones, epochs, d.epochs)
    t_milestones = _scaled(d.milestones, t_epochs, d.epochs)

    def sgd(nesterov: bool = False) -> Callable[[list[nn.Parameter]], torch.optim.Optimizer]:
        def make(params: list[nn.Parameter]) -> torch.optim.Optimizer:
            return torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay, nesterov=nesterov)

        return make

    def steps(ms: list[int]) -> Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]:
        # MultiStepLR's state holds a collections.Counter, which weights_only checkpoints refuse;
        # the same schedule as a LambdaLR keeps only numbers in its state.
        def factor(epoch: int) -> float:
            return float(d.gamma ** sum(epoch >= m for m in ms))

        return lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor)

    def data_for(seed: int) -> RunData:
        return run_data(
            ctx, splits, seed=seed, batch_size=args.batch_size, mean=mean, std=std, crop_padding=4, flip=True
        )

    results: list[RunResult] = []
    shared: dict[str, Any] = {}  # what methods reuse across seeds (the DIH heads)
    teacher_seed = args.seeds[0]
    if args.teacher_checkpoint is not None:
        teacher = build_model(args.teacher, n)
        load_teacher_weights(teacher, args.teacher_checkpoint)
        ctx.log(f"teacher {args.teacher}: weights from {args.teacher_checkpoint}")
    else:
        res = train_run(
            ctx,
            RunSpec(
                f"teacher-{args.teacher}",
                teacher_seed,
                lambda: CEStep(build_model(args.teacher, n)),
                sgd(),
                t_epochs,
                steps(t_milestones),
                resume=args.resume,
            ),
            data_for(teacher_seed),
        )
        results.append(res)
        if res.step is None:
            raise TrainerError("the teacher run returned no model")
        teacher = res.step.student
    teacher.eval()

    for seed in args.seeds:
        data = data_for(seed)

        def train_phase(
            name: str,
            build: Callable[[], DistillStep],
            t_side: nn.Module | None,
            phase_epochs: int,
            kind: str,
            seed: int = seed,
            data: RunData = data,
        ) -> DistillStep:
            ms = _scaled(d.milestones, phase_epochs, d.epochs)
            spec = RunSpec(
                name, seed, build, sgd(kind == "nesterov"), phase_epochs, steps(ms), teacher=t_side, resume=args.resume
            )
            out = train_run(ctx, spec, data)
            if out.step is None:
                raise TrainerError(f"phase {name!r} returned no model")
            return out.step

        for method in args.methods:
            msetup = MethodSetup(
                student=args.student,
                teacher=args.teacher,
                teacher_model=teacher,
                num_classes=n,
                temperature=args.temperature,
                ce_weight=args.ce_weight,
                kd_weight=args.kd_weight,
                train_phase=train_phase,
                train_batches=TrainBatches(data_for(teacher_seed), teacher_seed, ctx.config.max_batches),
                shared=shared,
                steps_per_epoch=len(data.train),
                epochs=epochs,
                init_epochs=1 if args.smoke else args.init_epochs,
                resume=bool(args.resume),
                checkpoint_dir=Path(ctx.config.out_dir) / "checkpoints" if ctx.is_main else None,
                log=ctx.log,
                logit=LogitOptions(ta=args.ta, ta_epochs=1 if args.smoke else args.ta_epochs),
                hint=HintOptions(weight=args.hint_weight, stage1_epochs=1 if args.smoke else args.fitnet_stage1_epochs),
                attention=AttentionOptions(beta=args.at_beta),
                contrastive=contrastive_options(args, recipe, train=data.train),
                cohort=CohortOptions(head_epochs=1 if args.smoke else args.head_epochs),
            )
            built = get_method(method).make(msetup)
            spec = RunSpec(
                method, seed, built.build, sgd(), epochs, steps(milestones), teacher=built.teacher, resume=args.resume
            )
            results.append(train_run(ctx, spec, data))

    published = meta.get("published_top1_best_epoch")
    if ctx.is_main and published:
        write_comparison(Path(ctx.config.out_dir) / "comparison.md", results, published, args.teacher)
    finish(
        ctx,
        args,
        recipe,
        results,
        {
            "data": splits.description,
            "teacher": args.teacher,
            "student": args.student,
            "methods": args.methods,
            "epochs": epochs,
            "milestones": milestones,
            **meta,
        },
    )
    return 0
