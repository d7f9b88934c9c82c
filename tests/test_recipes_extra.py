"""Smoke runs of the extra CIFAR methods (cc, vid, ab, ft, fsp, reviewkd; mhkd, tofd) on CPU.

Each method runs end to end through the CLI on a few images; the checks are the results file's
methods and that each method's trainable parts are in its checkpoint (so the optimiser, the
checkpoint and ``--resume`` see them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import kdloss
from reference_trainers.__main__ import main
from reference_trainers.errors import TrainerError
from reference_trainers.methods import METHODS, available_methods

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one torch thread (tests/conftest.py)

TINY = ["--smoke", "--device", "cpu", "--no-progress", "--threads", "1", "--batch-size", "8", "--seeds", "0"]
TINY += [
    "--val-size",
    "8",
    "--train-subset",
    "16",
    "--test-subset",
    "16",
    "--teacher",
    "resnet14",
    "--student",
    "resnet8",
]


def _methods(out: Path) -> list[str]:
    doc: dict[str, Any] = json.loads((out / "results.json").read_text())
    return [r["method"] for r in doc["summary"]]


def _keys(out: Path, run: str) -> set[str]:
    obj = torch.load(out / "checkpoints" / f"{run}.pt", map_location="cpu", weights_only=True)
    return set(obj["model"])


def _has(keys: set[str], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def test_registry_has_every_method() -> None:
    assert {"cc", "vid", "ab", "ft", "fsp", "reviewkd", "mhkd", "tofd"} <= set(available_methods())
    assert METHODS["mhkd"].missing is None
    assert METHODS["tofd"].missing is None


def test_benchmark_cifar100_extra_methods(tmp_path: Path) -> None:
    argv = ["benchmark-cifar100", *TINY, "--out", str(tmp_path), "--method", "cc,vid,ab,ft,fsp,reviewkd"]
    assert main(argv) == 0
    assert _methods(tmp_path) == ["teacher-resnet14", "cc", "vid", "ab", "ft", "fsp", "reviewkd"]
    keys = {run: _keys(tmp_path, f"{run}-seed0") for run in ("cc", "vid", "ab-init", "ft-paraphraser", "ft",
                                                             "fsp-init", "reviewkd")}  # fmt: skip
    assert _has(keys["cc"], "parts.")  # the LinearAdapter
    assert _has(keys["vid"], "parts.0.")
    assert _has(keys["vid"], "parts.2.")
    assert _has(keys["ab-init"], "parts.2.")  # one ABConnector per stage
    assert _has(keys["ft-paraphraser"], "paraphraser.")
    assert _has(keys["ft"], "parts.")  # the FTTranslator
    assert _has(keys["fsp-init"], "student.")
    assert _has(keys["reviewkd"], "parts.")
    assert "steps" in keys["reviewkd"]


def test_dih_mhkd_tofd(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A wider teacher (resnet8x4) than the student (resnet8): TOFD's feature adapters have weights.
    argv = ["dih", *TINY, "--out", str(tmp_path), "--method", "mhkd,tofd", "--teacher", "resnet8x4"]
    assert main(argv) == 0
    assert _methods(tmp_path) == ["teacher-resnet8x4", "mhkd", "tofd"]
    assert _has(_keys(tmp_path, "mhkd-seed0"), "heads.")
    tofd = _keys(tmp_path, "tofd-seed0")
    assert _has(tofd, "heads.")
    assert _has(tofd, "adapters.")
    # The teacher's fine-tuned heads are saved; --resume reads them instead of fine-tuning again.
    assert (tmp_path / "checkpoints" / "mhkd-teacher-heads-resnet8x4.pt").is_file()
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 0
    err = capsys.readouterr().err
    assert "MHKD: teacher heads loaded from" in err
    assert "TOFD: teacher heads loaded from" in err
    assert "fine-tuned" not in err
    _flip_a_middle_byte(tmp_path / "checkpoints" / "mhkd-teacher-heads-resnet8x4.pt")  # damaged: refused, exit 2
    assert main([*argv, "--resume"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert "the saved mhkd teacher heads (delete the file to fine-tune them again)" in errors[0]


@pytest.mark.parametrize("name", ["resnet8", "resnet18", "wrn_16_1", "vgg8"])
def test_preact_paths_give_the_pre_relu_stage_sums(name: str) -> None:
    """A FeatureTap on the models' preact_paths reads what AB needs: the sum before each stage's last ReLU."""
    from reference_trainers.methods.common import preact_paths
    from reference_trainers.models import build_model, stage_paths

    torch.manual_seed(0)
    net = build_model(name, 10).eval()
    stages = list(stage_paths(name))
    paths = preact_paths(net, name, stages)
    with kdloss.FeatureTap(net, paths) as pre, kdloss.FeatureTap(net, stages) as post:
        net(torch.randn(2, 3, 32, 32))
        for p, stage in zip(paths, stages, strict=True):
            assert (pre[p] < 0).any()  # a pre-activation, not a ReLU output
            if name.startswith("resnet"):  # the stage output is the ReLU of it
                torch.testing.assert_close(torch.relu(pre[p]), post[stage])
    with pytest.raises(TrainerError, match="pre-ReLU stage maps"):
        preact_paths(build_model("lightnn", 10), "lightnn", ["features"])


def test_reviewkd_warm_up_counts_steps_and_trains_the_fusion() -> None:
    from reference_trainers.methods import FeatureLossStep, FeatureOptions, MethodSetup, get_method
    from reference_trainers.models import build_model

    teacher = build_model("resnet14", 10).eval()
    setup = MethodSetup("resnet8", "resnet14", teacher, 10, 4.0, 1.0, 0.9,
                        steps_per_epoch=2, feature=FeatureOptions(reviewkd_warmup=1.0))  # fmt: skip
    built = get_method("reviewkd").make(setup)
    step = built.build().train()
    assert isinstance(step, FeatureLossStep)
    assert built.teacher is not None
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    scale = []
    for _ in range(3):  # warm-up factor min(1, steps / 2 / 1): 0, 0.5, 1
        raw = step(x, y, built.teacher(x))
        scale.append(float(raw.total.detach() - raw.parts["ce"]) / float(raw.parts["reviewkd"]))
        assert float(raw.parts["warmup"]) == pytest.approx(scale[-1])
    assert scale == pytest.approx([0.0, 0.5, 1.0], abs=1e-5)
    assert int(step.steps) == 3
    raw.total.backward()
    assert all(p.grad is not None for p in step.parts.parameters())  # the fusion is trained


def _flip_a_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


BAD_HEADS_FILES = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "one byte flipped": _flip_a_middle_byte,
    "not a torch file": lambda p: p.write_text("heads\n"),
    "a bare state dict": lambda p: torch.save({"head.weight": torch.zeros(2)}, p),
}


@pytest.mark.parametrize("damage", sorted(BAD_HEADS_FILES))
def test_a_damaged_or_malformed_heads_file_is_refused_in_one_line(damage: str, tmp_path: Path) -> None:
    """The saved teacher heads of mhkd / tofd are verified when read back (--resume), like a checkpoint."""
    from reference_trainers.errors import CheckpointError
    from reference_trainers.methods import CohortOptions, MethodSetup
    from reference_trainers.methods.cohort import teacher_heads
    from reference_trainers.models import build_model

    torch.manual_seed(0)
    teacher = build_model("resnet8", 10).eval()
    batches = [(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))]

    def setup(resume: bool) -> MethodSetup:
        return MethodSetup(
            "resnet8", "resnet8", teacher, 10, 4.0, 1.0, 0.9, train_batches=batches, checkpoint_dir=tmp_path,
            resume=resume, cohort=CohortOptions(head_epochs=1),
        )  # fmt: skip

    saved = teacher_heads(setup(resume=False), "mhkd")
    path = tmp_path / "mhkd-teacher-heads-resnet8.pt"
    again = teacher_heads(setup(resume=True), "mhkd")  # the file as written reads back
    for a, b in zip(saved.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    BAD_HEADS_FILES[damage](path)
    with pytest.raises(CheckpointError) as info:
        teacher_heads(setup(resume=True), "mhkd")
    message = str(info.value)
    assert "\n" not in message
    assert "the saved mhkd teacher heads (delete the file to fine-tune them again)" in message
    assert str(path) in message


def test_a_heads_file_of_other_heads_is_refused(tmp_path: Path) -> None:
    from reference_trainers.engine import CHECKPOINT_FORMAT, save_checkpoint
    from reference_trainers.errors import CheckpointError
    from reference_trainers.methods.cohort import load_heads, save_heads

    heads, other = torch.nn.Linear(3, 2), torch.nn.Linear(3, 4)
    path = tmp_path / "heads.pt"
    save_heads(path, heads, "mhkd", "resnet8")
    back = torch.nn.Linear(3, 2)
    load_heads(path, back, "mhkd", "resnet8")
    assert torch.equal(back.weight, heads.weight)
    with pytest.raises(CheckpointError, match=r"holds the mhkd heads of resnet8, not the tofd heads of resnet8$"):
        load_heads(path, back, "tofd", "resnet8")
    with pytest.raises(CheckpointError, match=r"holds the mhkd heads of resnet8, not the mhkd heads of resnet14$"):
        load_heads(path, back, "mhkd", "resnet14")
    with pytest.raises(CheckpointError, match=r"the teacher heads in .* do not fit: Error\(s\) in loading"):
        load_heads(path, other, "mhkd", "resnet8")
    save_checkpoint({"format": CHECKPOINT_FORMAT, "kind": "run"}, path)
    with pytest.raises(CheckpointError, match=r"is not a file of teacher heads \(kind 'run'\)"):
        load_heads(path, back, "mhkd", "resnet8")
