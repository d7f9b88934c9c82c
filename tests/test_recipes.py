"""Smoke runs of the model-zoo recipes (benchmark-cifar100, dih, blog-cifar10, hint-imagenette) on CPU.

Every recipe runs end to end through the CLI on a few images with tiny models; the checks are on
what a user gets: the exit code, the results files, the methods in them, the exported models,
and the messages for bad input.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import kdloss
from reference_trainers import models
from reference_trainers.__main__ import main
from reference_trainers.errors import CheckpointError, TrainerError
from reference_trainers.methods import (
    METHODS,
    DKDStep,
    HintOnlyStep,
    MethodEntry,
    available_methods,
    get_method,
    matching_stage_pairs,
    register_method,
)
from reference_trainers.models import ModelSpec, build_model, register_model
from reference_trainers.models.cifar_resnet import CifarResNet
from reference_trainers.recipes.cifar_kd import load_teacher_weights
from reference_trainers.recipes.hint_imagenette import make_synthetic_imagefolder

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one torch thread (tests/conftest.py)

TINY = ["--smoke", "--device", "cpu", "--no-progress", "--threads", "1"]
TINY += ["--val-size", "8", "--train-subset", "16", "--test-subset", "16"]


@pytest.fixture
def tiny_resnet() -> Iterator[str]:
    """A 4-stage CIFAR ResNet of 8 channels, registered as ``tiny4`` (layer1..layer4 like torchvision's)."""

    def factory(k: int) -> nn.Module:
        return CifarResNet((1, 1, 1, 1), (8, 8, 8, 8, 16), k)

    register_model(
        ModelSpec("tiny4", "test", factory, ("layer1", "layer2", "layer3", "layer4"), "flatten", "fc", "layer3")
    )
    yield "tiny4"
    models._REGISTRY.pop("tiny4")
    models.MODEL_NAMES = tuple(models._REGISTRY)


def _results(out: Path) -> dict[str, object]:
    assert (out / "results.md").is_file()
    assert (out / "results.png").is_file()
    doc: dict[str, object] = json.loads((out / "results.json").read_text())
    return doc


def _methods(doc: dict[str, object]) -> list[str]:
    return [r["method"] for r in doc["summary"]]  # type: ignore[index, attr-defined]


def test_benchmark_cifar100_smoke(tmp_path: Path) -> None:
    extra = [m for m in ("dkd", "dist", "sp", "pkt", "rkd", "nst") if m in available_methods()]
    methods = ",".join(["ce", "kd", "fitnet", "at", *extra])
    argv = ["benchmark-cifar100", *TINY, "--out", str(tmp_path), "--teacher", "resnet14", "--student", "resnet8"]
    assert main([*argv, "--batch-size", "8", "--method", methods, "--seeds", "0,1"]) == 0
    doc = _results(tmp_path)
    assert _methods(doc) == ["teacher-resnet14", "ce", "kd", "fitnet", "at", *extra]
    assert [r["n"] for r in doc["summary"]] == [1] + [2] * (4 + len(extra))  # type: ignore[index, attr-defined]
    meta = doc["meta"]
    assert meta["pair"] == "resnet14->resnet8"  # type: ignore[index]
    assert meta["published_top1_best_epoch"] is None  # type: ignore[index]
    assert (tmp_path / "checkpoints" / "fitnet-seed1.pt").is_file()
    assert not (tmp_path / "comparison.md").exists()  # no published numbers for this pair
    # A second call with --resume reuses every finished run (nothing is retrained).
    assert main([*argv, "--batch-size", "8", "--method", "kd", "--seeds", "0", "--resume"]) == 0


def test_benchmark_comparison_with_published_numbers(tmp_path: Path) -> None:
    argv = ["benchmark-cifar100", *TINY, "--out", str(tmp_path), "--teacher", "resnet56", "--student", "resnet20"]
    assert main([*argv, "--batch-size", "8", "--method", "kd", "--seeds", "0", "--teacher-epochs", "1"]) == 0
    table = (tmp_path / "comparison.md").read_text().splitlines()
    assert table[2].startswith("| teacher | 72.34 | ")
    assert table[3].endswith("| 69.06 | not run | not run |")  # ce was not selected
    assert table[4].startswith("| kd | 70.66 | ")
    assert table[4].endswith("(n=1) |")


def test_dih_smoke_and_missing_methods(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["dih", *TINY, "--out", str(tmp_path), "--teacher", "resnet14", "--student", "resnet8", "--seeds", "30"]
    assert main([*argv, "--batch-size", "8", "--method", "kd,fitnet2,at,dih"]) == 0
    doc = _results(tmp_path)
    assert _methods(doc) == ["teacher-resnet14", "kd", "fitnet2", "at", "dih"]
    dih = next(r for r in doc["runs"] if r["method"] == "dih")  # type: ignore[attr-defined]
    assert {"kd/0", "kd/1", "kd/2", "kd/3", "ce"} <= set(dih["history"][0]["parts"])  # 3 heads + final
    assert (tmp_path / "checkpoints" / "fitnet2-stage1-seed30.pt").is_file()  # stage 1 is a checkpointed run
    assert doc["meta"]["heads_k"] == 3  # type: ignore[index]
    assert main([*argv, "--method", "nope"]) == 2
    assert "unknown method 'nope'; available: ce, kd, fitnet, fitnet2, at" in capsys.readouterr().err


def test_blog_cifar10_smoke(tmp_path: Path, tiny_resnet: str) -> None:
    argv = ["blog-cifar10", *TINY, "--out", str(tmp_path), "--teacher", tiny_resnet, "--student", tiny_resnet]
    assert main([*argv, "--batch-size", "8"]) == 0
    doc = _results(tmp_path)
    assert _methods(doc) == ["teacher", "student-ce", "kd", "feature", "at", "self-distill"]
    deploy = json.loads((tmp_path / "deploy.json").read_text())
    assert [r["model"] for r in deploy] == ["teacher", "student-kd"]
    scripted = torch.jit.load(deploy[1]["file"])
    assert scripted(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert deploy[1]["parameters"] == sum(p.numel() for p in build_model(tiny_resnet, 10).parameters())
    assert "| teacher |" in (tmp_path / "deploy.md").read_text()
    # --faithful: no teacher fine-tuning, 1000-way heads on both sides (the source's mistake).
    out = tmp_path / "faithful"
    assert main(["blog-cifar10", *TINY, "--out", str(out), "--teacher", tiny_resnet, "--student", tiny_resnet,
                 "--faithful", "--method", "kd"]) == 0  # fmt: skip
    doc = _results(out)
    assert _methods(doc) == ["kd"]
    assert doc["meta"]["heads"] == 1000  # type: ignore[index]


def test_hint_imagenette_smoke(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    argv = ["hint-imagenette", "--smoke", "--device", "cpu", "--no-progress", "--synthetic", "--workers", "0"]
    argv += ["--threads", "1"]
    assert main([*argv, "--out", str(tmp_path / "no-weights")]) == 2  # no ImageNet weights: a clear message
    assert "no ImageNet weights for tv_resnet50" in capsys.readouterr().err
    out = tmp_path / "fixed"
    # random weights diverge in the hint run at the default --lr 0.01 (the engine stops with exit 2)
    assert main([*argv, "--out", str(out), "--random-init", "--batch-size", "4", "--lr", "0.001"]) == 0
    doc = _results(out)
    assert _methods(doc) == ["teacher", "hint"]
    assert doc["summary"][1]["val_best_mean"] is not None  # type: ignore[index]  # selected on a split of train/
    assert doc["meta"]["decode"] == "cpu"  # type: ignore[index]  # --decode auto without CUDA
    out = tmp_path / "faithful"
    assert main([*argv, "--out", str(out), "--random-init", "--batch-size", "4", "--faithful"]) == 0
    doc = _results(out)
    assert _methods(doc) == ["hint-faithful"]
    assert doc["summary"][0]["val_best_mean"] is None  # type: ignore[index]  # the source: the last epoch
    assert main(["hint-imagenette", "--smoke", "--device", "cpu", "--data-root", str(tmp_path / "absent")]) == 2
    assert "must contain train/" in capsys.readouterr().err


def test_hint_imagenette_decode_device_smoke(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from reference_trainers.data import Batch, FolderBatches
    from reference_trainers.recipes import hint_imagenette

    iterated: list[str] = []  # the decode mode of every source the run reads

    class Recording(FolderBatches):
        def batches(self, epoch: int = 0) -> Iterator[Batch]:
            iterated.append(self.decode)
            return super().batches(epoch)

    monkeypatch.setattr(hint_imagenette, "FolderBatches", Recording)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    argv = ["hint-imagenette", "--smoke", "--device", "cpu", "--no-progress", "--synthetic", "--random-init"]
    argv += ["--threads", "1", "--batch-size", "4", "--lr", "0.001"]  # random weights diverge at --lr 0.01
    out = tmp_path / "device"
    assert main([*argv, "--out", str(out), "--workers", "2", "--decode", "device"]) == 0
    doc = _results(out)
    assert _methods(doc) == ["teacher", "hint"]
    assert doc["meta"]["decode"] == "device"  # type: ignore[index]
    assert len(iterated) >= 6  # train, validation and test sources of both phases
    assert set(iterated) == {"device"}
    assert "ImageFolder decoding: device (--decode device, 2 workers)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--out", str(tmp_path / "bad"), "--decode", "gpu"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --decode: invalid choice: 'gpu'" in err
    assert "auto" in err  # the choices are listed
    assert "device" in err


def test_synthetic_imagefolder_has_imagenettes_shape(tmp_path: Path) -> None:
    from torchvision.io import decode_image

    root = make_synthetic_imagefolder(tmp_path, n_train=6, n_val=4, classes=3, short_side=40)
    train = sorted((root / "train").rglob("*.jpg"))
    assert len(train) == 6
    assert len(list((root / "val").rglob("*.jpg"))) == 4
    assert sorted(p.name for p in (root / "train").iterdir()) == ["class00", "class01", "class02"]
    sides = [decode_image(str(p)).shape[1:] for p in train]
    assert all(min(s) == 40 and max(s) <= 60 for s in sides)


def test_teacher_checkpoint_formats(tmp_path: Path) -> None:
    teacher = build_model("resnet8", 100)
    # The community benchmark's files: {"epoch": ..., "model": state_dict}.
    torch.save({"epoch": 240, "model": teacher.state_dict()}, tmp_path / "ckpt_epoch_240.pth")
    loaded = build_model("resnet8", 100)
    load_teacher_weights(loaded, tmp_path / "ckpt_epoch_240.pth")
    torch.testing.assert_close(loaded.state_dict()["fc.weight"], teacher.state_dict()["fc.weight"])
    # An engine checkpoint of a CE run: the step's state dict, student under "student.".
    torch.save({"model": {f"student.{k}": v for k, v in teacher.state_dict().items()}}, tmp_path / "engine.pt")
    load_teacher_weights(build_model("resnet8", 100), tmp_path / "engine.pt")
    with pytest.raises(CheckpointError, match="does not fit CifarResNet"):
        load_teacher_weights(build_model("resnet14", 100), tmp_path / "ckpt_epoch_240.pth")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_teacher_weights(teacher, tmp_path / "missing.pth")
    (tmp_path / "unsafe.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="refusing teacher checkpoint"):
        load_teacher_weights(teacher, tmp_path / "unsafe.pth")


def test_a_damaged_engine_checkpoint_is_refused_as_teacher(tmp_path: Path) -> None:
    """An engine checkpoint carries a checksum: as --teacher-checkpoint it is verified, like on --resume."""
    from reference_trainers.engine import CHECKPOINT_FORMAT, save_checkpoint

    teacher = build_model("resnet8", 10)
    state = {"format": CHECKPOINT_FORMAT, "model": {f"student.{k}": v for k, v in teacher.state_dict().items()}}
    save_checkpoint(state, tmp_path / "teacher.pt")
    loaded = build_model("resnet8", 10)
    load_teacher_weights(loaded, tmp_path / "teacher.pt")
    torch.testing.assert_close(loaded.state_dict(), teacher.state_dict())
    damaged = torch.load(tmp_path / "teacher.pt", weights_only=True)
    damaged["model"]["student.fc.weight"][0, 0] += 1.0  # the content changed, the checksum did not
    torch.save(damaged, tmp_path / "teacher.pt")
    with pytest.raises(CheckpointError, match=r"is damaged: its content does not match its checksum; it was not used"):
        load_teacher_weights(build_model("resnet8", 10), tmp_path / "teacher.pt")


def test_method_registry() -> None:
    assert {"ce", "kd", "fitnet", "fitnet2", "at"} <= set(available_methods())
    assert {"crd", "dih", "mhkd", "tofd", "takd"} <= set(METHODS)
    assert {"dih", "dkd", "dist", "sp", "pkt", "rkd", "nst"} <= set(available_methods())  # kdloss has them
    with pytest.raises(TrainerError, match="unknown method 'kdd'"):
        get_method("kdd")
    with pytest.raises(ValueError, match="'kd' is already registered"):
        register_method(METHODS["kd"])
    slot = METHODS["takd"]
    try:
        register_method(MethodEntry("takd", "test", METHODS["kd"].make), replace=True)
        assert get_method("takd").help == "test"
    finally:
        register_method(slot, replace=True)


def test_stage_pairs_and_hint_stage1_freezing() -> None:
    assert matching_stage_pairs("vgg8", "vgg13") == [(f"block{i}", f"block{i}") for i in (1, 2, 3, 4)]
    assert matching_stage_pairs("resnet8", "resnet34") == [(f"layer{i}", f"layer{i}") for i in (1, 2, 3)]
    assert matching_stage_pairs("wrn_16_2", "resnet18") == [
        ("block1", "layer1"),
        ("block2", "layer2"),
        ("block3", "layer3"),
    ]
    step = HintOnlyStep(build_model("resnet8", 10), "layer2", kdloss.ConvAdapter(32, 32, 3))
    trainable = {n for n, p in step.student.named_parameters() if p.requires_grad}
    assert {"conv1.weight", "layer2.0.conv2.weight"} <= trainable
    assert not any(n.startswith(("layer3", "fc")) for n in trainable)


def test_dkd_step_counts_epochs_for_the_warmup() -> None:
    class Recorder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.epochs: list[float] = []

        def forward(self, s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, *, epoch: float) -> torch.Tensor:
            self.epochs.append(epoch)
            return (s - t).square().mean()

    loss = Recorder()
    step = DKDStep(nn.Linear(4, 3), loss, ce_weight=1.0, steps_per_epoch=2)
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    for _ in range(3):
        step(x, y, {"logits": torch.randn(5, 3)})
    step.eval()
    step(x, y, {"logits": torch.randn(5, 3)})
    assert loss.epochs == [0.0, 0.5, 1.0, 1.5]
    assert int(step.state_dict()["steps"]) == 3  # checkpointed: a resumed run continues the warm-up
    with pytest.raises(KeyError, match="needs the teacher output 'logits'"):
        step(x, y, None)


def test_an_unavailable_method_says_what_is_missing() -> None:
    def make(setup: object) -> object:
        raise AssertionError("never built")

    register_method(MethodEntry("needs-x", "a method this installation lacks", make, missing="package x"))  # type: ignore[arg-type]
    try:
        assert "needs-x" not in available_methods()
        with pytest.raises(TrainerError, match="'needs-x' is not available in this installation: package x"):
            get_method("needs-x")
    finally:
        del METHODS["needs-x"]
