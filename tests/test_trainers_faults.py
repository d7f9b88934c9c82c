"""The trainers under faults: damaged and malformed checkpoints, killed writes, full or read-only disks,
bad data. Each gives a one-line error and exit code 2, and nothing is overwritten."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
import torch

from reference_trainers import engine
from reference_trainers.__main__ import main
from reference_trainers.engine import (
    CHECKPOINT_FORMAT,
    atomic,
    load_checkpoint,
    remove_stale_temps,
    save_checkpoint,
    train_run,
)
from reference_trainers.errors import CheckpointError, OutputError
from tests.engine_harness import cpu_context, hint_spec, tiny_data, tiny_teacher
from tests.test_trainers_cli import _jpeg_tree

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one torch thread (tests/conftest.py)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _jpeg_tree(tmp_path_factory.mktemp("data") / "tree", per_class=6)


def _demo(tree: Path, out: Path, *extra: str) -> list[str]:
    data = ["--dataset", "imagefolder", "--data-root", str(tree), "--val-size", "2"]
    return ["demo", "--smoke", *data, "--methods", "kd", "--out", str(out), *extra]


def _one_line_error(err: str, *needles: str) -> None:
    """stderr ends with one 'error: ...' line naming the problem, and holds no traceback."""
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: "), err
    for n in needles:
        assert n in last, (n, last)


def _trained_checkpoint(tmp: Path) -> Path:
    train_run(cpu_context(tmp), hint_spec(tiny_teacher(), 1), tiny_data(augment=False))
    return tmp / "checkpoints" / "hint-seed5.pt"


# ------------------------------------------------------------------------------------------ checksums


def test_flipped_bytes_in_tensor_data_are_detected(tmp_path: Path) -> None:
    """Four flipped bytes in a tensor used to load without error and train on from a corrupted model."""
    path = _trained_checkpoint(tmp_path)
    weight = load_checkpoint(path)["model"]["student.classifier.3.weight"]
    raw = path.read_bytes()
    at = raw.find(weight.contiguous().numpy().tobytes())
    assert at > 0
    damaged = bytearray(raw)
    damaged[at + 8 : at + 12] = bytes(b ^ 0xFF for b in damaged[at + 8 : at + 12])
    path.write_bytes(bytes(damaged))
    assert torch.load(path, weights_only=True)["epoch"] == 1  # torch itself loads it without a word
    with pytest.raises(CheckpointError, match=r"is damaged: its content does not match its checksum"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="is damaged"):
        train_run(cpu_context(tmp_path), hint_spec(tiny_teacher(), 1, resume=True), tiny_data(augment=False))
    assert path.read_bytes() == bytes(damaged)  # not overwritten


def test_a_changed_value_outside_tensors_is_detected_too(tmp_path: Path) -> None:
    path = _trained_checkpoint(tmp_path)
    ck = torch.load(path, weights_only=True)
    ck["epoch"] = 0  # e.g. a flipped bit in the pickled metadata that still unpickles
    torch.save(ck, path)
    with pytest.raises(CheckpointError, match="is damaged"):
        load_checkpoint(path)


def test_the_checksum_covers_every_key_and_survives_the_round_trip(tmp_path: Path) -> None:
    obj = {"format": CHECKPOINT_FORMAT, "a": torch.arange(6).view(2, 3).t(), "b": [1, 2.5, None, "x", (True,)]}
    save_checkpoint(obj, tmp_path / "c.pt")
    back = load_checkpoint(tmp_path / "c.pt")
    assert back["checksum"] == engine.checkpoint_digest(obj)
    assert back["checksum"].startswith("sha256:")
    for change in ({"b": [1, 2.5, None, "x", (False,)]}, {"a": torch.arange(6).view(2, 3)}, {"c": 1}):
        assert engine.checkpoint_digest({**back, **change}) != back["checksum"], change


def test_a_checkpoint_of_the_previous_format_is_refused_with_advice(tmp_path: Path) -> None:
    torch.save({"format": "reference_trainers.checkpoint/1", "epoch": 1}, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match=r"has format 'reference_trainers.checkpoint/1'.*drop --resume"):
        load_checkpoint(tmp_path / "old.pt")


# ------------------------------------------------------------------------------------------ malformed files


def _malformed(kind: str, path: Path, good: dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "text":
        path.write_text("hello, this is not a checkpoint\n")
    elif kind == "directory":
        path.mkdir()
        (path / "keep").write_text("x")
    elif kind == "empty":
        path.write_bytes(b"")
    else:  # a well-formed checkpoint (valid checksum) without a key, or with one of the wrong type
        state = {k: v for k, v in good.items() if k not in (kind, "checksum")}
        if kind == "history-type":
            state["history"] = "not a list"
        save_checkpoint(state, path)


MALFORMED = {
    "text": "cannot read checkpoint",
    "empty": "cannot read checkpoint",
    "directory": "is not a file",
    "method": "lacks 'method'",
    "model": "lacks 'model'",
    "history-type": "has 'history' of type str",
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_checkpoints_give_a_one_line_error_exit_2_and_stay(
    kind: str, tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Used to be KeyError: 101 (text), KeyError: 'method' / 'model', or a retrain then a crash (directory)."""
    good = load_checkpoint(_trained_checkpoint(tmp_path / "src"))
    out = tmp_path / "out"
    path = out / "checkpoints" / "teacher-seed42.pt"
    _malformed(kind, path, good)
    before = sorted(p.name for p in path.rglob("*")) if path.is_dir() else path.read_bytes()
    rc = main(_demo(tree, out, "--resume"))
    assert rc == 2
    _one_line_error(capsys.readouterr().err, MALFORMED[kind], "teacher-seed42.pt")
    after = sorted(p.name for p in path.rglob("*")) if path.is_dir() else path.read_bytes()
    assert after == before  # nothing overwritten
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["teacher-seed42.pt"]
    assert not (out / "results.json").exists()


def test_a_directory_in_the_checkpoints_place_fails_before_training(tmp_path: Path) -> None:
    (tmp_path / "checkpoints" / "hint-seed5.pt").mkdir(parents=True)
    calls = []
    spec = hint_spec(tiny_teacher(), 1)
    build = spec.build
    spec.build = lambda: calls.append(1) or build()  # type: ignore[func-returns-value]
    with pytest.raises(CheckpointError, match="is not a file"):
        train_run(cpu_context(tmp_path), spec, tiny_data(augment=False))  # without --resume too
    assert not calls  # refused before anything was built or trained


# ------------------------------------------------------------------------------------------ temp files, modes


def test_temp_files_of_killed_writes_are_removed_by_resume_and_next_writes(tmp_path: Path) -> None:
    path = _trained_checkpoint(tmp_path)
    stale = [path.parent / f".{path.name}.abcd_123.tmp", tmp_path / ".results.json.zz99yy88.tmp"]
    for p in stale:
        p.write_bytes(b"half a checkpoint")
    unrelated = [path.parent / f".{path.name}.x.tmp", path.parent / "notes.tmp", path.parent / "other.pt"]
    for p in unrelated:
        p.write_bytes(b"keep")
    train_run(cpu_context(tmp_path), hint_spec(tiny_teacher(), 1, resume=True), tiny_data(augment=False))
    assert not stale[0].exists()  # the run's start removed the stale temp of its checkpoint
    engine.atomic_write_bytes(tmp_path / "results.json", b"{}")
    assert not stale[1].exists()  # the next write of a file removes its stale temps
    assert all(p.exists() for p in unrelated)  # only the exact temp names of the file are touched
    assert remove_stale_temps(tmp_path / "missing" / "x.pt") == []


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_output_files_get_the_umasks_mode(tmp_path: Path, umask: int) -> None:
    """mkstemp's 0600 used to stay on every checkpoint and report."""
    old = os.umask(umask)
    try:
        engine.atomic_write_bytes(tmp_path / "results.md", b"# x\n")
        save_checkpoint({"format": CHECKPOINT_FORMAT}, tmp_path / "c.pt")
    finally:
        os.umask(old)
    for name in ("results.md", "c.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name


# ------------------------------------------------------------------------------------------ full / read-only disks


@pytest.mark.parametrize(
    ("syscall", "code", "reason"),
    [
        ("fsync", errno.ENOSPC, "No space left on device (free some space"),
        ("replace", errno.EROFS, "Read-only file system (the file system is read-only"),
        ("mkstemp", errno.EACCES, "Permission denied (fix the permissions"),
    ],
)
@pytest.mark.parametrize("target", [".pt", "results.json"], ids=["checkpoint", "report"])
def test_a_disk_error_during_a_run_is_a_one_line_error_exit_2(
    syscall: str,
    code: int,
    reason: str,
    target: str,
    tree: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A full disk or a read-only output during a run used to end in a traceback."""
    real = {"fsync": os.fsync, "replace": os.replace, "mkstemp": atomic.tempfile.mkstemp}[syscall]
    writing = [""]  # the file atomic_write_bytes is writing

    def failing(*args: object, **kw: object) -> object:
        if syscall == "fsync":
            hit = writing[0].endswith(target)
        elif syscall == "replace":
            hit = str(args[1]).endswith(target)
        else:
            hit = target in str(kw.get("prefix", ""))
        if hit:
            raise OSError(code, os.strerror(code))
        return real(*args, **kw)  # type: ignore[operator]

    real_write = atomic.atomic_write_bytes

    def tracking(path: str | os.PathLike[str], data: bytes) -> None:
        writing[0] = str(path)
        real_write(path, data)

    monkeypatch.setattr(atomic, "atomic_write_bytes", tracking)
    if syscall == "mkstemp":
        monkeypatch.setattr(atomic.tempfile, "mkstemp", failing)
    else:
        monkeypatch.setattr(os, syscall, failing)
    out = tmp_path / "out"
    assert main(_demo(tree, out)) == 2
    _one_line_error(capsys.readouterr().err, "cannot write", reason)
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_really_read_only_output_directory(tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    try:
        assert main(_demo(tree, out)) == 2
    finally:
        out.chmod(0o755)
    _one_line_error(capsys.readouterr().err, "cannot write")


def test_output_error_is_an_os_error_too() -> None:
    e = atomic.output_error(Path("x/c.pt"), OSError(errno.ENOSPC, "No space left on device"))
    assert isinstance(e, OutputError)
    assert isinstance(e, OSError)
    assert e.errno == errno.ENOSPC


# ------------------------------------------------------------------------------------------ bad data


def test_an_empty_training_class_folder_is_refused(
    tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It used to be accepted silently: a class with a label and an output but no image."""
    root = _jpeg_tree(tmp_path / "data", per_class=2)
    (root / "train" / "cat").mkdir()
    (root / "test" / "cat").mkdir()
    (root / "test" / "cat" / "0.jpg").write_bytes((root / "test" / "bird" / "0.jpg").read_bytes())
    out = tmp_path / "out"
    assert main(_demo(root, out)) == 2
    _one_line_error(capsys.readouterr().err, "class directories without images", "['cat']")
    assert not out.exists() or not any(out.rglob("*.pt"))
