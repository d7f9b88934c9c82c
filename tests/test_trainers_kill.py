"""SIGKILL at random points of a real run, checkpoint and report writes included: no torn file, no
orphaned temp file after ``--resume``, and the resumed run bit-identical to one never killed.

A tiny ``demo`` run (a JPEG tree of 12 images, CPU): the teacher, its cached outputs, two students
(``kd``, ``hint+kd``), a checkpoint after every step, the reports. Each trial picks an event (a
training step, half-way through a file's bytes, an fsync, the rename) and its occurrence with a
fixed seed, kills the child there with SIGKILL (nothing can be cleaned up at that moment), checks
what is on disk, resumes, and compares with the uninterrupted run. The children are forks of one
server process that imported torch once (``tests/_kill_runner.py``), so a trial costs about a run.
"""

from __future__ import annotations

import json
import multiprocessing
import random
import signal
from pathlib import Path

import pytest

from reference_trainers.engine import load_checkpoint
from tests import _kill_runner
from tests.test_trainers_cli import _jpeg_tree
from tests.test_trainers_signals import _argv, _assert_same_as_reference

pytestmark = pytest.mark.slow  # a forkserver and 11 short runs: about 20 s on 2 cores

TRIALS = 5  # the first four cover each event once, the fifth is drawn; all with fixed seeds

_CTX = multiprocessing.get_context("forkserver")
_CTX.set_forkserver_preload(["tests._kill_runner"])


def _run(tmp: Path, argv: list[str], event: str | None = None, at: int = 0) -> tuple[int | None, dict[str, int], str]:
    counts, log = tmp / f"counts-{event}-{at}.json", tmp / f"log-{event}-{at}.txt"
    p = _CTX.Process(target=_kill_runner.child, args=(argv, event, at, str(counts), str(log)))
    p.start()
    p.join(120)
    if p.is_alive():
        p.kill()
        p.join()
        pytest.fail(f"the child did not finish in 120 s: {log.read_text() if log.exists() else ''}")
    seen: dict[str, int] = json.loads(counts.read_text()) if counts.exists() else {}
    return p.exitcode, seen, log.read_text() if log.exists() else ""


def _files(out: Path) -> set[str]:
    return {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}


def _assert_nothing_torn(out: Path) -> None:
    for p in out.rglob("*.pt"):
        load_checkpoint(p)  # complete, and its checksum matches
    if (out / "results.json").exists():
        json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _jpeg_tree(tmp_path_factory.mktemp("data") / "tree", per_class=6)


@pytest.fixture(scope="module")
def reference(tree: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    tmp = tmp_path_factory.mktemp("kill-reference")
    rc, counts, log = _run(tmp, _argv(tree, tmp / "out"))
    assert rc == 0, log
    assert set(counts) == set(_kill_runner.EVENTS), counts
    return tmp / "out", counts


@pytest.mark.parametrize("trial", range(TRIALS))
def test_sigkill_at_a_random_point_then_resume_is_exact(
    trial: int, tree: Path, reference: tuple[Path, dict[str, int]], tmp_path: Path
) -> None:
    ref_out, counts = reference
    rng = random.Random(1000 + trial)
    events = _kill_runner.EVENTS
    event = events[trial] if trial < len(events) else rng.choice(events)
    at = rng.randint(1, counts[event])
    out = tmp_path / "out"
    argv = _argv(tree, out)
    rc, _, log = _run(tmp_path, argv, event, at)
    assert rc == -signal.SIGKILL, f"{event} #{at} of {counts[event]}: exit {rc}\n{log}"
    _assert_nothing_torn(out)
    if event == "write":  # killed half-way through a file's bytes: its temp file is left, the file is not torn
        assert any(f.endswith(".tmp") for f in _files(out)), _files(out)
    rc, _, log = _run(tmp_path, [*argv, "--resume"])
    assert rc == 0, log
    assert _files(out) == _files(ref_out)  # every temp file gone, nothing else left behind
    _assert_same_as_reference(out, ref_out)
