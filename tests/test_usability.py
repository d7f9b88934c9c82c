"""What a newcomer meets first: the swapped-arguments warning, help pages with real defaults, the
thread count, the demo's student subset, the embedded-data notes, the plot, running without tqdm."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import kdloss
from kdloss.functional import soft_kl
from reference_trainers.__main__ import build_parser
from reference_trainers.engine import Context, RunResult, TrainConfig, write_reports
from reference_trainers.engine import loop as engine
from reference_trainers.recipes import RECIPES, common, demo

# ------------------------------------------------------------------------------------ KDLoss


def test_kdloss_warns_when_student_and_teacher_look_swapped() -> None:
    student = torch.randn(4, 10, requires_grad=True)
    teacher = torch.randn(4, 10)
    with pytest.warns(UserWarning, match=r"teacher_logits requires grad but student_logits does not") as rec:
        loss = kdloss.KDLoss(temperature=2.0)(teacher, student)  # swapped
    assert not loss.requires_grad  # what the warning is about: nothing would train
    assert rec[0].filename == __file__  # it points at the caller's line, through the module call
    with pytest.warns(UserWarning, match="swapped"):
        soft_kl(teacher, student, temperature=2.0)


def test_kdloss_is_silent_in_the_right_order_and_without_grad() -> None:
    student = torch.randn(4, 10, requires_grad=True)
    teacher = torch.randn(4, 10, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kdloss.KDLoss(temperature=2.0)(student, teacher.detach())  # the usual call
        kdloss.KDLoss(temperature=2.0)(student, teacher)  # both train (mutual learning)
        with torch.no_grad():
            kdloss.KDLoss(temperature=2.0)(student.detach(), teacher)  # evaluation: nothing trains anyway


# ------------------------------------------------------------------------------------ --help


def _help(recipe: str) -> str:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return " ".join(sub.choices[recipe].format_help().split())


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_help_shows_real_defaults(recipe: str) -> None:
    text = _help(recipe)
    assert "recipe default" not in text
    assert "default: None" not in text
    assert "EXPERIMENTS" not in text
    epochs = {"demo": 12, "tutorial-cifar10": 10, "blog-cifar10": 10, "hint-imagenette": 5, "dih": 200}
    epochs["benchmark-cifar100"], epochs["lm-distil"] = 240, 4
    assert f"--epochs EPOCHS epochs per phase (default: {epochs[recipe]})" in text


def test_help_of_the_cifar100_recipes_names_their_data_set() -> None:
    for recipe in ("dih", "benchmark-cifar100"):
        assert "the data set (default: cifar100). auto:" in _help(recipe)
    assert "--seeds SEEDS comma-separated seeds, e.g. 42,0,1 (default: 30,50,67)" in _help("dih")
    assert "--val-size VAL_SIZE images of train/ held out for validation (default: min(500, 10 % of train/))" in (
        _help("hint-imagenette")
    )


# ------------------------------------------------------------------------------------ threads


@pytest.mark.parametrize(("cores", "load", "expected"), [(2, 0.2, 2), (2, 1.4, 1), (2, 5.0, 1), (8, 3.2, 5)])
def test_default_threads_are_the_idle_cores(
    monkeypatch: pytest.MonkeyPatch, cores: int, load: float, expected: int
) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(common.os, "sched_getaffinity", lambda _: set(range(cores)), raising=False)
    monkeypatch.setattr(common.os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(common.torch, "get_num_threads", lambda: 8)
    threads, why = common.default_threads()
    assert threads == expected
    assert f"{cores} usable cores, 1-minute load average {load:.1f}" == why


def test_default_threads_leave_omp_num_threads_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setattr(common.os, "getloadavg", lambda: (9.0, 9.0, 9.0))
    assert common.default_threads() == (torch.get_num_threads(), "OMP_NUM_THREADS=3")


# ------------------------------------------------------------------------------------ data notes


def _args(argv: list[str]) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    args.check(args)
    return args


def test_a_full_data_recipe_on_the_embedded_subset_says_so() -> None:
    args = _args(["tutorial-cifar10", "--dataset", "embedded"])
    assert args.embedded_note.startswith("note: tutorial-cifar10 on the embedded CIFAR-10 subset (5,000 training")
    assert "not comparable" in args.embedded_note
    args = _args(["blog-cifar10", "--smoke"])
    assert args.dataset == "embedded"
    assert "--smoke without --data-root" in args.embedded_note
    assert _args(["demo"]).embedded_note is None  # the demo is about the embedded subset


def test_the_demo_students_see_a_balanced_subset() -> None:
    labels = torch.arange(9000) % 10
    labels = labels[torch.randperm(9000, generator=torch.Generator().manual_seed(3))]
    idx = demo.balanced_subset(labels, 2000)
    assert idx.tolist() == sorted(set(idx.tolist()))
    assert torch.bincount(labels[idx], minlength=10).tolist() == [200] * 10
    assert torch.equal(idx, demo.balanced_subset(labels, 2000))  # the same subset for every seed and run
    assert torch.bincount(labels[demo.balanced_subset(labels, 15)], minlength=10).tolist() == [2] * 5 + [1] * 5


# ------------------------------------------------------------------------------------ reports


def _result(method: str, seed: int, acc: float) -> RunResult:
    history = [{"epoch": 1, "val_acc": acc, "test_acc": acc}]
    return RunResult(method, seed, 1, history, acc, acc, 1, acc, acc, 1.0, 100.0, None)


def _figure(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, results: list[RunResult]) -> Any:
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    saved: list[Any] = []
    original = Figure.savefig

    def keep(self: Any, *args: Any, **kwargs: Any) -> Any:
        saved.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    write_reports(tmp_path, results, {"recipe": "demo"})
    return saved[0]


def _texts(ax: Any) -> list[str]:
    return [t.get_text() for t in ax.texts] + [ax.get_title(), ax.get_ylabel()]


def test_the_plot_shows_no_spread_for_one_seed_and_no_truncated_bars(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from matplotlib.patches import Rectangle

    fig = _figure(monkeypatch, tmp_path, [_result("teacher", 42, 0.62), _result("kd", 42, 0.57)])
    ax = fig.axes[0]
    assert not [t for t in _texts(ax) if "±" in t], _texts(ax)
    bars = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert not bars or ax.get_ylim()[0] == 0  # points with intervals, or bars that start at 0
    assert "62.0" in " ".join(_texts(ax))


def test_the_plot_shows_the_spread_over_seeds(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    results = [_result("kd", 0, 0.50), _result("kd", 1, 0.54), _result("ce", 0, 0.49), _result("ce", 1, 0.49)]
    fig = _figure(monkeypatch, tmp_path, results)
    texts = " ".join(_texts(fig.axes[0]))
    assert "52.0 ± 2.8" in texts
    assert "49.0 ± 0.0" in texts  # two seeds that agree: a real spread of 0


# ------------------------------------------------------------------------------------ extras


def test_runs_without_progress_bars_need_no_tqdm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    ctx = Context(TrainConfig(device="cpu", progress=False), torch.device("cpu"))
    bar = engine._progress(ctx, 10, "no tqdm")
    bar.update(1)
    bar.set_postfix(loss="1.0")
    bar.close()
    args = build_parser().parse_args(["demo", "--no-progress"])
    common.check_extras(args)  # tqdm is not needed
    args = build_parser().parse_args(["demo"])
    with pytest.raises(common.TrainerError, match=r"missing: tqdm\): pip install '.\[trainers\]'.*--no-progress"):
        common.check_extras(args)
