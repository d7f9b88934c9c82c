"""``lm-distil``: distil a small causal transformer into a smaller one, on text that ships with the repository.

The corpus is the repository's own documentation (every ``docs/**/*.md``, concatenated in path
order; ``--corpus`` names another file or directory), read as bytes: byte-level tokens, V = 256, no
tokenizer. It is cut into three contiguous parts (90 / 5 / 5 %: train, validation, test) and each
into non-overlapping windows of ``--context`` tokens, each window predicting the next byte at
every position.

Per seed: ``teacher``: a :class:`~reference_trainers.models.causal_lm.CausalLM` (d = 96, 3 blocks,
3 heads; 10 epochs) trained with cross-entropy (or loaded with ``--teacher-checkpoint``); then
students (d = 48, 2 blocks, 1 head; 4 epochs), each built after ``torch.manual_seed(seed)`` so all
start from the same weights. AdamW (lr 3e-3, weight decay 0.01, cosine decay), 16 sequences of 64
tokens per batch.

- ``student-ce``: cross-entropy only;
- ``kd-forward``, ``kd-reverse``, ``kd-jsd``, ``kd-tv``: ``kdloss.FusedLinearKDLoss`` on the
  student's hidden states and output weight and the teacher's (the logits are never
  materialised), ``kd_weight * T**2 * D + (1 - kd_weight) * CE`` with the divergence ``D`` of the
  name (JSD with ``--jsd-weight``); the teacher's hidden states are computed once and cached;
- ``kd-topk``: ``kdloss.SparseKDLoss`` from the teacher's top-``--topk`` log-probabilities per
  token and their tail mass, written once into a ``kdloss.TeacherTopK`` store
  (``<out>/teacher-topk-seed<seed>``) and read back from it (at a temperature other than 1 the
  top-k are renormalised and the tail is not used).

Reports: the engine's table (next-token accuracy, in the accuracy columns; "images/s" counts
tokens) with its plot and checkpoints, and a perplexity table appended to ``results.md``
(``lm`` in ``results.json``): validation and test perplexity of each model after its last epoch,
the test forward KL to the teacher (nats per token), the test next-token accuracy.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kdloss
from kdloss.functional import soft_kl
from reference_trainers.data import TensorAugment, TensorBatches, TensorSplit
from reference_trainers.engine import (
    Context,
    RunData,
    RunResult,
    RunSpec,
    TeacherCache,
    atomic_write_bytes,
    load_checkpoint,
    setup,
    teacher_cache,
    train_run,
)
from reference_trainers.errors import TrainerError
from reference_trainers.methods import FusedLinearOptions
from reference_trainers.methods.fused_linear import DIVERGENCE_OF as DIVERGENCE_OF  # the names of earlier versions
from reference_trainers.methods.fused_linear import LM_METHODS, make_lm_method
from reference_trainers.methods.steps import LMCEStep, TeacherHidden, student_lm
from reference_trainers.methods.steps import LMFusedKDStep as LMFusedKDStep  # defined here in earlier versions
from reference_trainers.methods.steps import LMSparseKDStep as LMSparseKDStep
from reference_trainers.methods.steps import LMStudent as LMStudent
from reference_trainers.methods.steps import TeacherTopKSide as TeacherTopKSide
from reference_trainers.models.causal_lm import CausalLM, LMConfig
from reference_trainers.recipes.common import config_from_args, finish

NAME = "lm-distil"
HELP = "distil a small causal transformer into a smaller one on the repository's docs (byte-level, CPU minutes)"
METHODS = LM_METHODS
DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "docs"
HEAD_DIM = 32  # heads = width / 32
# (context, teacher width, teacher layers, student width, student layers): the default and --smoke's
SIZES = {"default": (64, 96, 3, 48, 2), "smoke": (32, 32, 1, 16, 1)}
SMOKE_CORPUS_BYTES = 24_000
# the flags every recipe shares that describe image data: refused here rather than ignored
_IMAGE_DATA_FLAGS = {
    "dataset": "auto",
    "data_root": None,
    "download": False,
    "val_size": 0,
    "workers": 0,
    "train_subset": None,
    "test_subset": None,
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--corpus", type=Path, default=None, help="a text file or a directory of *.md/*.txt (default: docs/)"
    )
    p.add_argument("--context", type=int, default=None, help="tokens per sequence (default 64; --smoke: 32)")
    p.add_argument("--teacher-epochs", type=int, default=None, help="teacher epochs (default 10; --smoke: --epochs)")
    p.add_argument(
        "--teacher-width", type=int, default=None, help="teacher width d, heads of 32 (default 96; --smoke: 32)"
    )
    p.add_argument("--teacher-layers", type=int, default=None, help="teacher blocks (default 3; --smoke: 1)")
    p.add_argument("--student-width", type=int, default=None, help="student width d (default 48; --smoke: 16)")
    p.add_argument("--student-layers", type=int, default=None, help="student blocks (default 2; --smoke: 1)")
    p.add_argument(
        "--teacher-checkpoint",
        type=Path,
        default=None,
        help="a teacher from an earlier run (<out>/checkpoints/teacher-seed<seed>.pt): not trained again",
    )
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (cosine decay over the epochs)")
    opts = FusedLinearOptions()
    p.add_argument("--temperature", type=float, default=opts.temperature, help="KD temperature")
    p.add_argument("--kd-weight", type=float, default=opts.kd_weight, help="weight of the KD term (CE gets 1 - it)")
    p.add_argument(
        "--jsd-weight", type=float, default=opts.jsd_weight, help="the teacher's weight in the JSD mixture (kd-jsd)"
    )
    p.add_argument("--topk", type=int, default=opts.topk, help="teacher classes kept per token for kd-topk")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.set_defaults(epochs=4, batch_size=16, val_size=0)  # the corpus has its own split: no image validation


# ------------------------------------------------------------------------------------------- data


def load_corpus(path: Path) -> tuple[Tensor, list[Path]]:
    """The bytes of ``path`` (a file, or every ``*.md`` and ``*.txt`` under a directory in path order) as uint8."""
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".md", ".txt") and p.is_file())
        if not files:
            raise TrainerError(f"--corpus: no *.md or *.txt file under {str(path)!r}")
    else:
        raise TrainerError(f"--corpus: {str(path)!r} does not exist (pass a text file or a directory of them)")
    data = b"\n\n".join(f.read_bytes() for f in files)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone(), files


def windows(tokens: Tensor, context: int) -> TensorSplit:
    """Non-overlapping windows: inputs ``tokens[i : i + L]`` (uint8), targets ``tokens[i + 1 : i + L + 1]`` (int64)."""
    n = (tokens.numel() - 1) // context
    if n < 1:
        raise TrainerError(
            f"a split of {tokens.numel()} bytes holds no sequence of {context} + 1 tokens: use a larger corpus"
        )
    x = tokens[: n * context].view(n, context)
    y = tokens[1 : n * context + 1].view(n, context).long()
    return TensorSplit(x.clone(), y.clone())


class TokenIds(TensorAugment):
    """The engine's augmentation slot for token data: uint8 token ids in, int64 ids out, nothing random."""

    def __init__(self) -> None:
        super().__init__((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))

    def normalise(self, x: Tensor) -> Tensor:
        return x.long()

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return x.long()


# ------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def lm_metrics(
    ctx: Context, lm: CausalLM, split: TensorSplit, *, teacher: CausalLM | None = None, batch_size: int = 64
) -> dict[str, float]:
    """Mean next-token cross-entropy (nats), perplexity, accuracy, and (with ``teacher``) the mean
    forward KL(teacher || model) per token, over every sequence of ``split``."""
    was = lm.training
    lm.eval()
    ce_sum = kl_sum = 0.0
    correct = tokens = 0
    for start in range(0, len(split), batch_size):
        x = split.images[start : start + batch_size].to(ctx.device).long()
        y = split.labels[start : start + batch_size].to(ctx.device)
        with ctx.autocast():
            logits = lm(x).float()
        ce_sum += float(F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"))
        correct += int((logits.argmax(-1) == y).sum())
        tokens += y.numel()
        if teacher is not None:
            with ctx.autocast():
                t_logits = teacher(x).float()
            kl = soft_kl(logits, t_logits, reduction="sum")
            kl_sum += float(kl)
    lm.train(was)
    ce = ce_sum / max(tokens, 1)
    out = {"ce": ce, "perplexity": math.exp(ce), "accuracy": correct / max(tokens, 1), "tokens": float(tokens)}
    if teacher is not None:
        out["kl_to_teacher"] = kl_sum / max(tokens, 1)
    return out


def _row(
    method: str,
    seed: int,
    epochs: int,
    val: dict[str, float],
    test: dict[str, float],
    train_s: float,
    tok_s: float | None,
) -> dict[str, Any]:
    return {
        "method": method,
        "seed": seed,
        "epochs": epochs,
        "val_perplexity": val["perplexity"],
        "test_perplexity": test["perplexity"],
        "test_ce": test["ce"],
        "test_kl_to_teacher": test.get("kl_to_teacher"),
        "test_accuracy": test["accuracy"],
        "train_time_s": train_s,
        "tokens_per_s": tok_s,
    }


def _table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| method | seed | epochs | val perplexity | test perplexity | test KL(teacher \\|\\| model) | "
        "test accuracy % | train s | tokens/s |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for r in rows:
        kl = "-" if r["test_kl_to_teacher"] is None else f"{r['test_kl_to_teacher']:.4f}"
        speed = "-" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.0f}"
        lines.append(
            f"| {r['method']} | {r['seed']} | {r['epochs']} | {r['val_perplexity']:.3f} | {r['test_perplexity']:.3f} "
            f"| {kl} | {100 * r['test_accuracy']:.2f} | {r['train_time_s']:.1f} | {speed} |"
        )
    return head + "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------- the run


def _check_args(args: argparse.Namespace, methods: list[str]) -> None:
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise TrainerError(f"unknown method(s) {unknown} in --methods; choose from {', '.join(METHODS)}")
    used = [f"--{k.replace('_', '-')}" for k, v in _IMAGE_DATA_FLAGS.items() if getattr(args, k) != v]
    if used:
        raise TrainerError(f"lm-distil reads a text corpus (--corpus): {', '.join(used)} describe image data")
    if not 0.0 < args.kd_weight <= 1.0:
        raise TrainerError(
            f"--kd-weight must lie in (0, 1] (0 leaves nothing to distil: that is student-ce), got {args.kd_weight}"
        )
    if args.teacher_epochs is not None and args.teacher_epochs < 1:
        raise TrainerError(f"--teacher-epochs must be >= 1, got {args.teacher_epochs}")
    if not 0.0 < args.jsd_weight < 1.0:
        raise TrainerError(f"--jsd-weight must lie in (0, 1), got {args.jsd_weight}")
    if not (args.temperature > 0 and math.isfinite(args.temperature)):
        raise TrainerError(f"--temperature must be a finite number > 0, got {args.temperature}")
    if not 1 <= args.topk <= 256:
        raise TrainerError(f"--topk must lie in [1, 256] (byte vocabulary), got {args.topk}")
    for name in ("context", "teacher_width", "teacher_layers", "student_width", "student_layers"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise TrainerError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.teacher_checkpoint is not None and not args.teacher_checkpoint.is_file():
        raise TrainerError(f"--teacher-checkpoint: {str(args.teacher_checkpoint)!r} does not exist")


def _config(width: int, layers: int, context: int, *, dropout: float) -> LMConfig:
    try:
        return LMConfig(
            context=context, d_model=width, n_layers=layers, n_heads=max(1, width // HEAD_DIM), dropout=dropout
        )
    except ValueError as e:
        raise TrainerError(f"model size: {e}") from e


def _load_teacher(path: Path, cfg: LMConfig) -> CausalLM:
    """The teacher of an earlier ``lm-distil`` run from its engine checkpoint (read with ``weights_only=True``)."""
    ck = load_checkpoint(path)
    prefix = "student.lm."
    state = {k[len(prefix) :]: v for k, v in ck["model"].items() if k.startswith(prefix)}
    lm = CausalLM(cfg)
    try:
        lm.load_state_dict(state)
    except RuntimeError as e:
        raise TrainerError(
            f"--teacher-checkpoint {str(path)!r} does not hold an lm-distil teacher of {cfg.to_dict()}: "
            f"{str(e).splitlines()[0]}"
        ) from e
    return lm


def _topk_store(
    ctx: Context, args: argparse.Namespace, teacher: CausalLM, train: TensorSplit, path: Path, meta: dict[str, Any]
) -> tuple[kdloss.TeacherTopK, float]:
    """Write the teacher's top-k for every training token once (rank 0; reused on --resume when it matches)."""
    t0 = time.perf_counter()
    n, length = train.images.shape
    if ctx.is_main:
        existing = None
        if args.resume and path.exists():
            try:
                existing = kdloss.TeacherTopK(path)
                existing.verify()  # every byte, before a store from an earlier run is trusted
            except (OSError, ValueError) as e:
                ctx.log(f"not reusing the teacher store {str(path)!r}: {e}; writing it again")
                existing = None
        if existing is None or existing.metadata != meta or existing.k != args.topk:
            teacher.to(ctx.device).eval()
            with kdloss.TeacherTopK.create(
                path, num_tokens=n * length, k=args.topk, vocab_size=256, overwrite=True, metadata=meta
            ) as writer:
                for start in range(0, n, 256):
                    x = train.images[start : start + 256].to(ctx.device).long()
                    with torch.no_grad(), ctx.autocast():
                        writer.add_logits(teacher(x))
    ctx.barrier()
    store = kdloss.TeacherTopK(path)
    seconds = time.perf_counter() - t0
    ctx.log(f"teacher top-{args.topk} of {n * length:,} training tokens in {str(path)!r} ({seconds:.1f} s)")
    return store, seconds


def _methods(args: argparse.Namespace) -> list[str]:
    return [m.strip() for m in args.methods.split(",") if m.strip()]


def check(args: argparse.Namespace) -> None:
    """The recipe's options, before anything runs: methods, sizes, weights, the corpus and the teacher."""
    _check_args(args, _methods(args))
    corpus = args.corpus if args.corpus is not None else DEFAULT_CORPUS
    if not corpus.exists():
        where = "" if args.corpus is not None else " (the repository's docs/: pass --corpus when kdloss is installed)"
        raise TrainerError(f"--corpus: {str(corpus)!r} does not exist{where}")


def run(args: argparse.Namespace) -> int:
    methods = _methods(args)
    _check_args(args, methods)
    smoke = bool(args.smoke)
    given = (args.context, args.teacher_width, args.teacher_layers, args.student_width, args.student_layers)
    context, t_width, t_layers, s_width, s_layers = (
        v if v is not None else d for v, d in zip(given, SIZES["smoke" if smoke else "default"])
    )
    t_cfg = _config(t_width, t_layers, context, dropout=0.0)
    s_cfg = _config(s_width, s_layers, context, dropout=0.0)
    ctx = setup(config_from_args(args, NAME))

    corpus_path = args.corpus if args.corpus is not None else DEFAULT_CORPUS
    tokens, files = load_corpus(corpus_path)
    if smoke:
        tokens = tokens[:SMOKE_CORPUS_BYTES]
    sha = hashlib.sha256(tokens.numpy().tobytes()).hexdigest()
    n = tokens.numel()
    cut1, cut2 = int(0.9 * n), int(0.95 * n)
    train, val, test = (
        windows(tokens[:cut1], context),
        windows(tokens[cut1:cut2], context),
        windows(tokens[cut2:], context),
    )
    description = (
        f"corpus: {len(files)} file(s) under {corpus_path} ({n:,} bytes{' (smoke: the first ones)' if smoke else ''}, "
        f"sha256 {sha[:16]}), byte-level tokens (V = 256), context {context}; train / val / test = 90 / 5 / 5 % "
        f"contiguous: {len(train)} / {len(val)} / {len(test)} sequences; accuracies are next-token accuracies, "
        "images/s counts tokens"
    )
    ctx.log(description)
    if args.teacher_epochs is not None:
        t_epochs = args.teacher_epochs
    else:
        t_epochs = args.epochs if smoke else 10
    epochs, lr = args.epochs, args.lr
    options = FusedLinearOptions(
        temperature=args.temperature, kd_weight=args.kd_weight, jsd_weight=args.jsd_weight, topk=args.topk
    )

    def adamw(params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01)

    def cosine(n_epochs: int) -> Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]:
        return lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=n_epochs)

    results: list[RunResult] = []
    lm_rows: list[dict[str, Any]] = []
    out_dir = Path(ctx.config.out_dir)
    for seed in args.seeds:
        shard: dict[str, Any] = {"rank": ctx.rank, "world_size": ctx.world_size}
        data = RunData(
            train=TensorBatches(train, args.batch_size, ctx.device, shuffle=True, seed=seed, **shard),
            val=TensorBatches(val, ctx.config.eval_batch_size, ctx.device, **shard),
            test=TensorBatches(test, ctx.config.eval_batch_size, ctx.device, **shard),
            train_augment=TokenIds(),
            eval_augment=TokenIds(),
        )
        if args.teacher_checkpoint is not None:
            teacher = _load_teacher(args.teacher_checkpoint, t_cfg)
            teacher_source: dict[str, Any] = {"checkpoint": str(args.teacher_checkpoint)}
            trained: RunResult | None = None
        else:
            trained = train_run(
                ctx,
                RunSpec(
                    "teacher",
                    seed,
                    lambda: LMCEStep(CausalLM(t_cfg)),
                    adamw,
                    t_epochs,
                    cosine(t_epochs),
                    resume=args.resume,
                ),
                data,
            )
            results.append(trained)
            assert trained.step is not None
            teacher = student_lm(trained.step)
            teacher_source = {
                "seed": seed,
                "epochs": t_epochs,
                "lr": lr,
                "batch_size": args.batch_size,
                "config": t_cfg.to_dict(),
            }
        teacher.to(ctx.device).eval()
        runs: list[tuple[RunResult, CausalLM | None]] = []
        if trained is not None:
            runs.append((trained, None))
        else:  # the teacher of the checkpoint: measured, not trained
            v, te = lm_metrics(ctx, teacher, val), lm_metrics(ctx, teacher, test)
            lm_rows.append(_row("teacher (checkpoint)", seed, 0, v, te, 0.0, None))
        hidden_side = TeacherHidden(teacher)
        hidden_cache: TeacherCache | None = None
        if any(m in DIVERGENCE_OF for m in methods):
            hidden_cache = teacher_cache(ctx, hidden_side, data)

        for method in methods:
            built = make_lm_method(method, s_cfg, teacher, options, hidden_side=hidden_side)
            t_side = built.teacher
            cache = hidden_cache if t_side is hidden_side else None
            if method == "kd-topk" and t_side is not None and ctx.config.cache_teacher:
                meta = {"corpus_sha256": sha, "context": context, "split": "train", "teacher": teacher_source}
                store, seconds = _topk_store(ctx, args, teacher, train, out_dir / f"teacher-topk-seed{seed}", meta)
                lp, idx, tail = store.read(0, len(store), device=ctx.device)
                outputs = {
                    "logprobs": lp.view(len(train), context, -1),
                    "indices": idx.view(len(train), context, -1),
                }
                if tail is not None:
                    outputs["tail"] = tail.view(len(train), context)
                cache = TeacherCache(outputs, seconds, t_side)
            res = train_run(
                ctx,
                RunSpec(
                    method,
                    seed,
                    built.build,
                    adamw,
                    epochs,
                    cosine(epochs),
                    teacher=t_side,
                    teacher_cache=cache,
                    resume=args.resume,
                ),
                data,
            )
            results.append(res)
            runs.append((res, teacher))
        for res, t in runs:
            assert res.step is not None
            lm = student_lm(res.step)
            v, te = lm_metrics(ctx, lm, val), lm_metrics(ctx, lm, test, teacher=t)
            lm_rows.append(_row(res.method, seed, res.epochs, v, te, res.train_time_s, res.images_per_s))
    table = _table(lm_rows)
    meta = {
        "data": description,
        "corpus_files": [str(f) for f in files],
        "teacher_config": t_cfg.to_dict(),
        "student_config": s_cfg.to_dict(),
        "lm": lm_rows,
        "methods": methods,
    }
    finish(ctx, args, NAME, results, meta)
    if ctx.is_main:
        md = out_dir / "results.md"
        text = md.read_text() if md.exists() else f"# {NAME}\n"
        text += "\n## Perplexity (each model after its last epoch)\n\n" + table
        atomic_write_bytes(md, text.encode())
        print("\n" + table, end="")
    return 0
