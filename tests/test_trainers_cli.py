"""The CLI: every recipe runs a few batches, bad input gives a clear message and exit 2 and leaves no results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torchvision.io import encode_jpeg

from reference_trainers.__main__ import main
from reference_trainers.data import TensorAugment, TensorBatches, TensorSplit
from reference_trainers.engine import CHECKPOINT_FORMAT, Context, RunData, RunSpec, TrainConfig, train_run
from reference_trainers.methods import CEStep
from reference_trainers.models import LightNN
from reference_trainers.recipes import RECIPES

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one torch thread (tests/conftest.py)


def _jpeg_tree(root: Path, per_class: int = 4) -> Path:
    g = torch.Generator().manual_seed(0)
    for split in ("train", "test"):
        for c in ("airplane", "bird"):
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                img = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=g)
                (root / split / c / f"{i}.jpg").write_bytes(encode_jpeg(img).numpy().tobytes())
    return root


def _no_outputs(out: Path) -> None:
    if out.exists():
        names = {p.name for p in out.rglob("*")}
        assert not names & {"results.json", "results.md", "results.png"}, names
        assert not [n for n in names if n.endswith((".pt", ".tmp"))], names


# ------------------------------------------------------------------------------------ usage errors


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["nope"], "invalid choice: 'nope'"),
        ([], "the following arguments are required: <recipe>"),
        (["demo", "--bogus"], "unrecognized arguments: --bogus"),
        (["demo", "--seeds", "4x"], "expected comma-separated integers"),
        (["tutorial-cifar10", "--epochs", "0"], "expected a positive integer, got '0'"),
        (["demo", "--dataset", "mnist"], "invalid choice: 'mnist'"),
    ],
)
def test_usage_errors_exit_2_with_a_message(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_help_lists_every_recipe(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in RECIPES)
    assert set(RECIPES) >= {"demo", "tutorial-cifar10"}


# ------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--methods", "kd,magic"], "unknown method(s) ['magic'] in --methods"),
        (["tutorial-cifar10", "--phases", "kd,nope"], "unknown phase(s) ['nope'] in --phases"),
    ],
)
def test_unknown_method_or_phase(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_missing_data_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    rc = main(["tutorial-cifar10", "--smoke", "--data-root", str(tmp_path / "missing"), "--out", str(out)])
    assert rc == 2
    assert "error: --data-root" in (err := capsys.readouterr().err)
    assert "does not exist" in err
    _no_outputs(out)


def test_corrupt_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _jpeg_tree(tmp_path / "data")
    (root / "train" / "bird" / "2.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    out = tmp_path / "out"
    rc = main(["tutorial-cifar10", "--smoke", "--data-root", str(root), "--val-size", "2", "--out", str(out)])
    assert rc == 2
    assert "cannot decode image" in (err := capsys.readouterr().err)
    assert "2.jpg" in err
    _no_outputs(out)


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("this must never run",))


def test_unsafe_checkpoint_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    torch.save({"format": CHECKPOINT_FORMAT, "x": _Evil()}, out / "checkpoints" / "teacher-seed42.pt")
    rc = main(["tutorial-cifar10", "--smoke", "--resume", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 2
    assert "refusing to load checkpoint" in captured.err
    assert "this must never run" not in captured.out + captured.err
    assert not (out / "results.json").exists()


def test_checkpoint_of_another_model_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    split = TensorSplit(torch.zeros(8, 3, 32, 32, dtype=torch.uint8), torch.zeros(8, dtype=torch.int64))
    aug = TensorAugment((0.5,) * 3, (0.5,) * 3)
    data = RunData(TensorBatches(split, 8), None, TensorBatches(split, 8), aug, aug)
    ctx = Context(TrainConfig(device="cpu", progress=False, out_dir=out), torch.device("cpu"))
    spec = RunSpec("teacher", 42, lambda: CEStep(LightNN()), lambda p: torch.optim.SGD(p, lr=0.1), 1)
    train_run(ctx, spec, data)  # a LightNN "teacher": not the tutorial's DeepNN
    rc = main(["tutorial-cifar10", "--smoke", "--resume", "--out", str(out)])
    assert rc == 2
    assert "was written for method 'teacher' seed 42 (CEStep / LightNN)" in capsys.readouterr().err
    assert not (out / "results.json").exists()


# ------------------------------------------------------------------------------------ recipes run


def _results(out: Path) -> dict[str, object]:
    doc: dict[str, object] = json.loads((out / "results.json").read_text())
    assert (out / "results.md").read_text().startswith("# ")
    assert (out / "results.png").stat().st_size > 1000
    return doc


def test_tutorial_smoke_on_an_image_folder(tmp_path: Path) -> None:
    root = _jpeg_tree(tmp_path / "data")
    out = tmp_path / "out"
    argv = ["tutorial-cifar10", "--smoke", "--data-root", str(root), "--val-size", "2", "--out", str(out)]
    assert main(argv) == 0
    doc = _results(out)
    assert [r["method"] for r in doc["summary"]] == ["teacher", "student-ce", "kd", "cosine", "regressor"]  # type: ignore[index]
    assert "ImageFolder" in doc["meta"]["data"]  # type: ignore[index]
    assert doc["meta"]["environment"]["torch"] == str(torch.__version__)  # type: ignore[index]


def test_demo_smoke_stops_and_resumes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    argv = ["demo", "--smoke", "--epochs", "2", "--out", str(out), "--methods", "student-ce,kd,hint+kd,at+kd"]
    assert main([*argv, "--resume", "--stop-after-epoch", "1"]) == 3  # --resume, but nothing to resume yet
    err = capsys.readouterr().err
    assert "nothing to resume: every run starts from scratch" in err
    assert "continue with --resume" in err
    assert not (out / "results.json").exists()
    assert main([*argv]) == 2  # checkpoints are there now: not without --resume or --overwrite
    assert "already holds checkpoints of an earlier run" in capsys.readouterr().err
    assert main([*argv, "--resume"]) == 0
    doc = _results(out)
    runs = doc["runs"]
    assert [r["method"] for r in runs] == ["teacher", "student-ce", "kd", "hint+kd", "at+kd"]  # type: ignore[index, union-attr]
    assert all(r["epochs"] == 2 for r in runs)  # type: ignore[index, union-attr]
    assert "| kd | 42 |" in capsys.readouterr().out


def test_demo_smoke_stops_inside_an_epoch_and_resumes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--smoke trains 2 batches an epoch: step 3 is the first step of epoch 2 of the teacher's run."""
    out = tmp_path / "out"
    argv = ["demo", "--smoke", "--epochs", "2", "--checkpoint-every", "1", "--out", str(out)]
    assert main([*argv, "--stop-after-step", "3"]) == 3
    assert "stopped at step 1 of epoch 2" in capsys.readouterr().err
    assert not (out / "results.json").exists()
    assert main([*argv, "--resume"]) == 0
    cap = capsys.readouterr()
    assert "resumed from" in cap.err + cap.out
    assert "at step 1 of epoch 2" in cap.err + cap.out
    doc = _results(out)
    assert all(r["epochs"] == 2 for r in doc["runs"])  # type: ignore[index, union-attr]
