"""SIGINT / SIGTERM in every phase of a recipe: honoured at the next safe point with exit code 3 and a
checkpoint, never acknowledged and then ignored; ``--resume`` then ends bit-identical to a run that was
never stopped.

Each test runs the real CLI (``demo`` on a tiny JPEG tree, in this process) and sends this process a
real signal from inside the phase under test: the teacher's training, the teacher cache, a student's
training, right after a run's last step, between runs, and while the reports are written.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from reference_trainers.__main__ import main
from reference_trainers.data import TensorAugment
from reference_trainers.engine import checkpoint, load_checkpoint, loop, reports
from reference_trainers.methods import TeacherOutputs
from reference_trainers.recipes import common
from tests.test_trainers_cli import _jpeg_tree

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one torch thread (tests/conftest.py)

# 10 training images in batches of 4, --smoke: 2 steps an epoch, 2 epochs: 4 steps per run;
# runs: teacher, then kd and hint+kd on the cached teacher outputs.
METHODS = "kd,hint+kd"


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _jpeg_tree(tmp_path_factory.mktemp("data") / "tree", per_class=6)


def _argv(tree: Path, out: Path) -> list[str]:
    data = [
        "--dataset",
        "imagefolder",
        "--data-root",
        str(tree),
        "--val-size",
        "2",
        "--batch-size",
        "4",
        "--student-batch-size",
        "4",
    ]
    return [
        "demo",
        "--smoke",
        "--epochs",
        "2",
        "--checkpoint-every",
        "1",
        "--methods",
        METHODS,
        *data,
        "--out",
        str(out),
    ]


@pytest.fixture(scope="module")
def reference(tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same command, never stopped."""
    out = tmp_path_factory.mktemp("reference")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(_argv(tree, out)) == 0
    finally:
        torch.set_num_threads(n)
    return out


_VOLATILE = {"time_s", "images_per_s", "train_time_s", "teacher_cache_s"}


def _runs(out: Path) -> list[dict[str, Any]]:
    doc = json.loads((out / "results.json").read_text())
    runs = doc["runs"]
    for r in runs:
        for k in _VOLATILE:
            r.pop(k, None)
        for h in r["history"]:
            for k in _VOLATILE:
                h.pop(k, None)
    return runs  # type: ignore[no-any-return]


def _assert_same_as_reference(out: Path, reference: Path) -> None:
    assert _runs(out) == _runs(reference)
    names = sorted(p.name for p in (reference / "checkpoints").iterdir())
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == names
    for name in names:
        a, b = load_checkpoint(out / "checkpoints" / name), load_checkpoint(reference / "checkpoints" / name)
        assert a["done"]
        assert a["model"].keys() == b["model"].keys()
        for k in a["model"]:
            assert torch.equal(a["model"][k], b["model"][k]), (name, k)
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def _kill_self(signame: str) -> None:
    os.kill(os.getpid(), getattr(signal, signame))


def _at_augment_call(n: int, signame: str, mp: pytest.MonkeyPatch, times: int = 1) -> None:
    """Send the signal (``times`` times) in the ``n``-th training-augmentation call: inside a training step."""
    real = TensorAugment.__call__
    calls = [0]

    def call(self: TensorAugment, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        calls[0] += 1
        if calls[0] == n:
            for _ in range(times):
                _kill_self(signame)
        return real(self, x, generator)

    mp.setattr(TensorAugment, "__call__", call)


def _in_teacher_cache(signame: str, mp: pytest.MonkeyPatch) -> None:
    real = TeacherOutputs.forward

    def forward(self: TeacherOutputs, x: torch.Tensor) -> dict[str, torch.Tensor]:
        _kill_self(signame)
        return real(self, x)

    mp.setattr(TeacherOutputs, "forward", forward)


def _in_final_checkpoint_of(method: str, signame: str, mp: pytest.MonkeyPatch) -> None:
    """While a run writes its last checkpoint: after its last step (the case that used to be ignored)."""
    real = checkpoint.save_checkpoint

    def save(obj: Any, path: Any) -> None:
        if obj["done"] and obj["method"] == method:
            _kill_self(signame)
        real(obj, path)

    mp.setattr(checkpoint, "save_checkpoint", save)


def _between_runs_after(method: str, signame: str, mp: pytest.MonkeyPatch) -> None:
    """After a run returned its result, before the next one starts."""
    real = loop._result

    def result(run: Any) -> Any:
        out = real(run)
        if run.spec.method == method:
            _kill_self(signame)
        return out

    mp.setattr(loop, "_result", result)


def _in_report_plot(signame: str, mp: pytest.MonkeyPatch) -> None:
    real = reports._plot_png

    def plot(*args: Any) -> bytes:
        _kill_self(signame)
        return real(*args)

    mp.setattr(reports, "_plot_png", plot)


def _after_reports(signame: str, mp: pytest.MonkeyPatch) -> None:
    """While the table is printed, after the last report file: the end of the recipe's guard."""
    real = common.markdown_table

    def table(rows: Any) -> str:
        _kill_self(signame)
        return real(rows)

    mp.setattr(common, "markdown_table", table)


PHASES: dict[str, tuple[Callable[[str, pytest.MonkeyPatch], None], str, str]] = {
    # phase: (inject, signal, what stderr says); augment calls 1-4 are the teacher's steps, 5-8 kd's
    "teacher-step": (lambda s, mp: _at_augment_call(3, s, mp), "SIGINT", "stopped at step 1 of epoch 2 of 'teacher'"),
    "teacher-last-step": (
        lambda s, mp: _in_final_checkpoint_of("teacher", s, mp),
        "SIGTERM",
        "stopped after the last epoch of 'teacher' seed 42 (finished, checkpoint written)",
    ),
    "teacher-cache": (_in_teacher_cache, "SIGTERM", "stopped while caching the teacher's outputs"),
    "student-step": (lambda s, mp: _at_augment_call(5, s, mp), "SIGINT", "stopped at step 1 of epoch 1 of 'kd'"),
    "student-epoch-end": (lambda s, mp: _at_augment_call(6, s, mp), "SIGTERM", "stopped after epoch 1 of 'kd'"),
    "between-runs": (
        lambda s, mp: _between_runs_after("kd", s, mp),
        "SIGINT",
        "stopped before 'hint+kd' seed 42 started",
    ),
    "report": (_in_report_plot, "SIGTERM", "stopped while writing the reports"),
    "after-reports": (_after_reports, "SIGINT", "stopped after the last step, with every file written"),
}


@pytest.mark.parametrize("phase", list(PHASES))
def test_a_stop_signal_is_honoured_in_every_phase_and_resume_is_exact(
    phase: str, tree: Path, reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inject, signame, message = PHASES[phase]
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    out = tmp_path / "out"
    with pytest.MonkeyPatch.context() as mp:
        inject(signame, mp)
        rc = main(_argv(tree, out))
    err = capsys.readouterr().err
    assert rc == 3, err
    assert "Traceback" not in err
    assert f"{signame}: stopping at the next safe point" in err  # acknowledged once...
    assert f"stopped: {message}" in err, err  # ...and honoured
    assert f"({signame}); continue with --resume" in err or phase == "after-reports"
    assert {s: signal.getsignal(s) for s in before} == before  # the handlers are gone again
    if phase not in ("report", "after-reports"):
        assert not (out / "results.json").exists()  # no run after the stop: nothing reported
    for ck in (out / "checkpoints").iterdir():  # every checkpoint there is complete and verified
        load_checkpoint(ck)
    if phase == "teacher-step":  # the step in progress finished and was checkpointed
        ck = load_checkpoint(out / "checkpoints" / "teacher-seed42.pt")
        assert (ck["epoch"], ck["done"], ck["partial"]["steps"]) == (1, False, 1)
    assert main([*_argv(tree, out), "--resume"]) == 0
    _assert_same_as_reference(out, reference)


def test_a_second_signal_stops_at_once(
    tree: Path, reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    with pytest.MonkeyPatch.context() as mp:
        _at_augment_call(3, "SIGINT", mp, times=2)
        assert main(_argv(tree, out)) == 3
    err = capsys.readouterr().err
    assert "stopped: a second SIGINT: stopped at once" in err
    assert "Traceback" not in err
    ck = load_checkpoint(out / "checkpoints" / "teacher-seed42.pt")  # the last one written is intact:
    assert (ck["epoch"], "partial" in ck) == (1, False)  # epoch 1's, not one of the interrupted step
    assert main([*_argv(tree, out), "--resume"]) == 0
    _assert_same_as_reference(out, reference)
