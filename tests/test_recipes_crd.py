"""CRD and TAKD in the CIFAR recipes: sample indices in the step, checkpointed banks, DDP, the TA phase."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import kdloss
from reference_trainers.__main__ import main
from reference_trainers.engine import (
    DistillStep,
    RunData,
    RunResult,
    RunSpec,
    StopRequested,
    load_checkpoint,
    train_run,
)
from reference_trainers.errors import TrainerError
from reference_trainers.methods import METHODS, CRDStep, MethodSetup, TeacherOutputs, available_methods
from reference_trainers.models import LightNN
from tests.engine_harness import cpu_context, tiny_data, tiny_split, tiny_teacher

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one torch thread (tests/conftest.py)

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--smoke", "--device", "cpu", "--no-progress", "--threads", "1"]
TINY += ["--val-size", "8", "--train-subset", "16", "--test-subset", "16", "--batch-size", "8"]
BANKS = ("crd.memory.bank_student", "crd.memory.bank_teacher", "crd.memory.normalizers")


def _data(*, augment: bool) -> RunData:
    return tiny_data(augment=augment, n_train=40, batch_size=8)


def _crd_spec(teacher: nn.Module, epochs: int, *, resume: bool = False) -> RunSpec:
    def build() -> DistillStep:
        crd = kdloss.CRDLoss(8, 16, n_data=40, feat_dim=8, n_negatives=24)
        student = LightNN(3, width=2, image_size=8)
        return CRDStep(student, "features", crd, temperature=4.0, ce_weight=1.0, kd_weight=0.5, crd_weight=0.8)

    return RunSpec(
        "crd",
        3,
        build,
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
        epochs,
        teacher=TeacherOutputs(teacher, {"features": "features"}),
        resume=resume,
    )


def _state(res: RunResult) -> dict[str, Tensor]:
    assert res.step is not None
    return res.step.state_dict()


@pytest.mark.parametrize("augment", [False, True])  # cached teacher / online teacher
def test_kill_and_resume_reproduces_crd_heads_banks_and_z(tmp_path: Path, augment: bool) -> None:
    teacher = tiny_teacher()
    init = _crd_spec(teacher, 3).build().state_dict()
    full = train_run(cpu_context(tmp_path / "a"), _crd_spec(teacher, 3), _data(augment=augment))
    with pytest.raises(StopRequested):
        train_run(cpu_context(tmp_path / "b", stop_after_epoch=1), _crd_spec(teacher, 3), _data(augment=augment))
    saved = load_checkpoint(tmp_path / "b" / "checkpoints" / "crd-seed3.pt")["model"]
    assert set(BANKS) <= set(saved)
    assert bool((saved["crd.memory.normalizers"] > 0).all())
    resumed = train_run(cpu_context(tmp_path / "b"), _crd_spec(teacher, 3, resume=True), _data(augment=augment))
    a, b = _state(full), _state(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for k in ("crd.memory.bank_student", "crd.memory.bank_teacher", "crd.embed_student.linear.weight"):
        assert not torch.equal(a[k], init[k]), k  # the banks and heads did train
    assert torch.equal(a["crd.memory.normalizers"], saved["crd.memory.normalizers"])  # Z fixed by the first step
    assert [h["parts"] for h in full.history] == [h["parts"] for h in resumed.history]


@pytest.mark.parametrize("augment", [False, True])  # cached teacher / online teacher
def test_stop_inside_an_epoch_and_resume_reproduces_crd(tmp_path: Path, augment: bool) -> None:
    """40 samples in batches of 8: stopped at step 7 (epoch 2, step 2), the negatives drawn after the
    resume come from the restored RNG, so heads, banks and Z equal an uninterrupted run's."""
    teacher = tiny_teacher()
    full = train_run(cpu_context(tmp_path / "a"), _crd_spec(teacher, 3), _data(augment=augment))
    with pytest.raises(StopRequested, match="stopped at step 2 of epoch 2"):
        train_run(cpu_context(tmp_path / "b", stop_after_step=7), _crd_spec(teacher, 3), _data(augment=augment))
    resumed = train_run(cpu_context(tmp_path / "b"), _crd_spec(teacher, 3, resume=True), _data(augment=augment))
    a, b = _state(full), _state(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [h["parts"] for h in full.history] == [h["parts"] for h in resumed.history]


class _IndexSpy(DistillStep):
    """Records what the engine passes: index, labels and the teacher logits."""

    needs_index = True

    def __init__(self) -> None:
        super().__init__()
        self.student = LightNN(3, width=2, image_size=8)
        self.calls: list[tuple[Tensor, Tensor, Tensor]] = []

    def forward(  # type: ignore[override]
        self, images: Tensor, labels: Tensor, teacher: dict[str, Tensor] | None, index: Tensor | None = None
    ) -> kdloss.LossParts:
        assert index is not None
        assert teacher is not None
        self.calls.append((index.clone(), labels.clone(), teacher["logits"].clone()))
        loss = nn.functional.cross_entropy(self.student(images), labels)
        return kdloss.LossParts(loss, {"total": loss.detach()})


def test_engine_passes_split_indices_matching_labels_and_cached_teacher(tmp_path: Path) -> None:
    teacher = tiny_teacher().eval()
    data = _data(augment=False)  # deterministic: the teacher outputs come from the cache, looked up by index
    spy = _IndexSpy()
    train_run(cpu_context(tmp_path), RunSpec("spy", 0, lambda: spy, lambda p: torch.optim.SGD(p, lr=0.1), 2,
                                      teacher=TeacherOutputs(teacher)), data)  # fmt: skip
    split = tiny_split(40, 1)
    seen = torch.cat([c[0] for c in spy.calls])
    assert len(spy.calls) == 10
    assert sorted(seen[:40].tolist()) == list(range(40))
    with torch.no_grad():
        ref = teacher(data.eval_augment.normalise(split.images))
    for index, labels, t_logits in spy.calls:
        assert index.dtype == torch.int64
        assert torch.equal(labels, split.labels[index])
        torch.testing.assert_close(t_logits, ref[index])


def test_crd_step_needs_the_index_and_the_teacher_features() -> None:
    crd = kdloss.CRDLoss(8, 16, n_data=40, feat_dim=8, n_negatives=4)
    step = CRDStep(LightNN(3, width=2, image_size=8), "features", crd, temperature=4.0, ce_weight=1.0,
                   kd_weight=0.0, crd_weight=0.8)  # fmt: skip
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="CRDStep needs index="):
        step(x, y, {"logits": torch.randn(2, 3), "features": torch.randn(2, 16)})
    with pytest.raises(KeyError, match="'features'; the teacher side gave \\['logits'\\]"):
        step(x, y, {"logits": torch.randn(2, 3)}, index=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="n_data=40"):
        step(x, y, {"logits": torch.randn(2, 3), "features": torch.randn(2, 16)}, index=torch.tensor([0, 40]))
    setup = MethodSetup("resnet8", "resnet8", nn.Linear(2, 2), 10, 4.0, 0.1, 0.9)
    with pytest.raises(TrainerError, match="size of the training split"):
        METHODS["crd"].make(setup)


def _doc(out: Path) -> dict[str, object]:
    doc: dict[str, object] = json.loads((out / "results.json").read_text())
    return doc


def test_benchmark_cifar100_crd_smoke(tmp_path: Path) -> None:
    assert {"crd", "takd"} <= set(available_methods())
    argv = ["benchmark-cifar100", *TINY, "--out", str(tmp_path), "--teacher", "resnet8", "--student", "resnet8"]
    assert main([*argv, "--method", "crd", "--seeds", "0", "--crd-nce-k", "64"]) == 0
    doc = _doc(tmp_path)
    crd = next(r for r in doc["runs"] if r["method"] == "crd")  # type: ignore[attr-defined]
    assert set(crd["history"][0]["parts"]) == {"ce", "crd"}  # the benchmark's CE 1 + 0.8 CRD, no KD
    state = load_checkpoint(tmp_path / "checkpoints" / "crd-seed0.pt")["model"]
    # one bank row per image of the training split actually trained on (16; the 8 validation images excluded)
    assert "16 train / 8 val" in str(doc["meta"]["data"])  # type: ignore[index]
    assert state["crd.memory.bank_student"].shape == (16, 128)
    assert state["crd.memory.bank_teacher"].shape == (16, 128)
    assert state["crd.memory.labels"].shape == (16,)  # RepDistiller's class-aware negatives, the default


def test_dih_crd_and_takd_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["dih", *TINY, "--out", str(tmp_path), "--teacher", "resnet14", "--student", "resnet8", "--seeds", "30"]
    assert main([*argv, "--method", "takd"]) == 2  # no assistant named
    assert "--ta MODEL" in capsys.readouterr().err
    assert (
        main([*argv, "--method", "crd,takd", "--ta", "resnet8", "--crd-nce-k", "64", "--crd-negatives", "uniform"]) == 0
    )
    doc = _doc(tmp_path)
    assert [r["method"] for r in doc["summary"]] == ["teacher-resnet14", "crd", "takd"]  # type: ignore[index, attr-defined]
    crd = next(r for r in doc["runs"] if r["method"] == "crd")  # type: ignore[attr-defined]
    assert set(crd["history"][0]["parts"]) == {"ce", "kd", "crd"}  # DIH's alpha 0.1 KD + beta 0.03 CRD
    assert "crd.memory.labels" not in load_checkpoint(tmp_path / "checkpoints" / "crd-seed30.pt")["model"]
    ta = load_checkpoint(tmp_path / "checkpoints" / "takd-ta-resnet8-seed30.pt")  # the TA is a checkpointed phase
    assert ta["done"]
    assert ta["signature"]["class"] == "KDStep"
    assert "TAKD: training the assistant resnet8 with KD from resnet14" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_two_gloo_processes_crd_banks_agree(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "reference_trainers", "benchmark-cifar100", *TINY,
        "--teacher", "resnet8", "--student", "resnet8", "--method", "crd", "--seeds", "0", "--epochs", "2",
        "--crd-nce-k", "64", "--out", str(out),
    ]  # fmt: skip
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # check_ranks_agree compares every state tensor, the CRD banks and Z included (DDP does not broadcast them)
    assert "[crd seed 0] all 2 ranks hold the same weights" in proc.stderr
    state = load_checkpoint(out / "checkpoints" / "crd-seed0.pt")["model"]
    assert state["crd.memory.bank_student"].shape == (16, 128)
    doc = _doc(out)
    crd = next(r for r in doc["runs"] if r["method"] == "crd")  # type: ignore[attr-defined]
    assert [h["images"] for h in crd["history"]] == [16, 16]  # each rank trains its half of the 16 images
