"""reference_trainers.engine: exact resume, safe checkpoints, teacher cache, selection on validation, reports."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from reference_trainers.data import Batch, TensorAugment, TensorBatches
from reference_trainers.engine import (
    CHECKPOINT_FORMAT,
    Context,
    RunData,
    RunResult,
    RunSpec,
    StopRequested,
    TrainConfig,
    atomic_write_bytes,
    load_checkpoint,
    save_checkpoint,
    summarise,
    teacher_cache,
    train_run,
    write_reports,
)
from reference_trainers.errors import CheckpointError, TrainingDiverged
from reference_trainers.methods import CEStep, KDStep, TeacherOutputs
from reference_trainers.models import LightNN
from tests.engine_harness import MEAN, STD, cpu_context, hint_spec, tiny_data, tiny_split, tiny_teacher

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one torch thread (tests/conftest.py)


def _state(res: RunResult) -> dict[str, torch.Tensor]:
    assert res.step is not None
    return res.step.state_dict()


@pytest.mark.parametrize("augment", [True, False], ids=["augmented-online-teacher", "cached-teacher"])
def test_kill_and_resume_gives_bit_identical_weights(tmp_path: Path, augment: bool) -> None:
    teacher = tiny_teacher()
    full = train_run(cpu_context(tmp_path / "a"), hint_spec(teacher, 2), tiny_data(augment=augment))
    with pytest.raises(StopRequested, match="stopped after epoch 1"):
        train_run(cpu_context(tmp_path / "b", stop_after_epoch=1), hint_spec(teacher, 2), tiny_data(augment=augment))
    ck = load_checkpoint(tmp_path / "b" / "checkpoints" / "hint-seed5.pt")
    assert (ck["epoch"], ck["done"]) == (1, False)
    resumed = train_run(cpu_context(tmp_path / "b"), hint_spec(teacher, 2, resume=True), tiny_data(augment=augment))
    a, b = _state(full), _state(resumed)
    assert a.keys() == b.keys()
    assert any("adapter" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [h["loss"] for h in full.history] == [h["loss"] for h in resumed.history]
    assert full.test_selected == resumed.test_selected
    # a finished run resumes to its stored result without training
    again = train_run(cpu_context(tmp_path / "b"), hint_spec(teacher, 2, resume=True), tiny_data(augment=augment))
    assert again.history == resumed.history
    assert torch.equal(_state(again)["student.classifier.3.weight"], b["student.classifier.3.weight"])


def _assert_same_run(full: RunResult, resumed: RunResult) -> None:
    a, b = _state(full), _state(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [h["loss"] for h in full.history] == [h["loss"] for h in resumed.history]
    assert [h["parts"] for h in full.history] == [h["parts"] for h in resumed.history]
    assert full.test_selected == resumed.test_selected


# 48 training images in batches of 16: 3 steps per epoch, 9 in 3 epochs
@pytest.mark.parametrize("augment", [True, False], ids=["augmented-online-teacher", "cached-teacher"])
@pytest.mark.parametrize("stop_step", [2, 4, 6], ids=["epoch1-step2", "epoch2-step1", "end-of-epoch2"])
def test_stop_inside_an_epoch_and_resume_gives_bit_identical_weights(
    tmp_path: Path, augment: bool, stop_step: int
) -> None:
    teacher = tiny_teacher()
    full = train_run(cpu_context(tmp_path / "a"), hint_spec(teacher, 3), tiny_data(augment=augment))
    with pytest.raises(StopRequested, match="continue with --resume"):
        train_run(
            cpu_context(tmp_path / "b", stop_after_step=stop_step), hint_spec(teacher, 3), tiny_data(augment=augment)
        )
    ck = load_checkpoint(tmp_path / "b" / "checkpoints" / "hint-seed5.pt")
    assert ck["run_steps"] == stop_step
    if stop_step % 3:  # inside an epoch: the epoch's progress is in the checkpoint
        assert (ck["epoch"], ck["partial"]["steps"]) == (stop_step // 3, stop_step % 3)
    else:  # on an epoch's last step: the ordinary end-of-epoch checkpoint
        assert (ck["epoch"], "partial" in ck) == (stop_step // 3, False)
    resumed = train_run(cpu_context(tmp_path / "b"), hint_spec(teacher, 3, resume=True), tiny_data(augment=augment))
    _assert_same_run(full, resumed)
    assert full.train_time_s > 0
    assert resumed.train_time_s > 0


class _DrawsWhenAnEpochStarts:
    """A batch source that draws from the global torch RNG when an epoch's iteration starts, as a
    ``DataLoader`` without a generator does for its workers' seed, and lets the draw decide the
    batch order."""

    deterministic = False

    def __init__(self, inner: TensorBatches) -> None:
        self.inner = inner

    @property
    def num_samples(self) -> int:
        return self.inner.num_samples

    def __len__(self) -> int:
        return len(self.inner)

    def batches(self, epoch: int = 0):  # type: ignore[no-untyped-def]
        seed = int(torch.randint(0, 2**31, (1,)))  # the draw from the global RNG
        parts = list(self.inner.batches(epoch))
        images = torch.cat([b.images for b in parts])
        labels = torch.cat([b.labels for b in parts])
        index = torch.cat([b.index for b in parts])
        perm = torch.randperm(len(index), generator=torch.Generator().manual_seed(seed))
        for chunk in perm.split(len(parts[0].index)):
            yield Batch(images[chunk], labels[chunk], index[chunk])


def test_resume_inside_an_epoch_rebuilds_its_batches_from_the_epochs_starting_rng(tmp_path: Path) -> None:
    teacher = tiny_teacher()

    def data() -> RunData:
        d = tiny_data(augment=True)
        return replace(d, train=_DrawsWhenAnEpochStarts(d.train))  # type: ignore[arg-type]

    full = train_run(cpu_context(tmp_path / "a"), hint_spec(teacher, 2), data())
    with pytest.raises(StopRequested):
        train_run(cpu_context(tmp_path / "b", stop_after_step=4), hint_spec(teacher, 2), data())
    resumed = train_run(cpu_context(tmp_path / "b"), hint_spec(teacher, 2, resume=True), data())
    _assert_same_run(full, resumed)


def test_resume_inside_an_epoch_with_another_batch_size_is_refused(tmp_path: Path) -> None:
    teacher = tiny_teacher()
    with pytest.raises(StopRequested):
        train_run(cpu_context(tmp_path, stop_after_step=2), hint_spec(teacher, 2), tiny_data(augment=False))
    other = replace(tiny_data(augment=False), train=TensorBatches(tiny_split(48, 1), 8, shuffle=True, seed=0))
    msg = r"stopped at step 2 of an epoch of 3 batches, but this run.s epochs have 6"
    with pytest.raises(CheckpointError, match=msg):
        train_run(cpu_context(tmp_path), hint_spec(teacher, 2, resume=True), other)


def test_checkpoint_every_writes_progress_inside_epochs(tmp_path: Path) -> None:
    teacher = tiny_teacher()
    seen: list[tuple[int, int]] = []
    original = save_checkpoint

    def spy(obj: dict[str, object], path: Path) -> None:
        partial = obj.get("partial")
        seen.append((int(obj["epoch"]), int(partial["steps"]) if isinstance(partial, dict) else 0))  # type: ignore[call-overload]
        original(obj, path)

    import reference_trainers.engine.checkpoint as engine

    mp = pytest.MonkeyPatch()
    mp.setattr(engine, "save_checkpoint", spy)
    try:
        train_run(cpu_context(tmp_path, checkpoint_every=2), hint_spec(teacher, 2), tiny_data(augment=True))
    finally:
        mp.undo()
    # steps 2 (epoch 1), end of epoch 1, step 2 (epoch 2), end of epoch 2
    assert seen == [(0, 2), (1, 0), (1, 2), (2, 0)]


class _NaNFromCall(TensorAugment):
    """The training augmentation, returning NaN images from its ``at``-th call on (a diverging run)."""

    def __init__(self, at: int, augment: TensorAugment) -> None:
        self.__dict__.update(augment.__dict__)
        self.at, self.calls = at, 0

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        self.calls += 1
        out = super().__call__(x, generator)
        return torch.full_like(out, float("nan")) if self.calls >= self.at else out


@pytest.mark.parametrize(
    ("checkpoint_every", "where", "kept"),
    [(None, "diverged by epoch 2", (1, 0)), (1, "diverged by step 2 of epoch 2", (1, 1))],
    ids=["at-the-epoch-end", "at-a-mid-epoch-checkpoint"],
)
def test_a_diverged_run_stops_before_a_checkpoint_of_nan_weights(
    tmp_path: Path, checkpoint_every: int | None, where: str, kept: tuple[int, int]
) -> None:
    data = tiny_data(augment=False)  # 48 images in batches of 16: 3 steps an epoch
    data.train_augment = _NaNFromCall(5, data.train_augment)  # the 2nd step of epoch 2 gets NaN images
    ctx = cpu_context(tmp_path, checkpoint_every=checkpoint_every)
    with pytest.raises(TrainingDiverged, match=rf"'hint' seed 5 {where}: the mean training loss is not finite \(") as e:
        train_run(ctx, hint_spec(tiny_teacher(), 3), data)
    assert "the last finite checkpoint" in str(e.value)
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "hint-seed5.pt")
    partial = ckpt.get("partial")
    assert (ckpt["epoch"], partial["steps"] if isinstance(partial, dict) else 0) == kept
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


class _SignalAtCall(TensorAugment):
    """The training augmentation, sending this process a signal at its ``at``-th call (a user's Ctrl-C)."""

    def __init__(self, at: int, signum: int, augment: TensorAugment) -> None:
        self.__dict__.update(augment.__dict__)
        self.at, self.signum, self.calls = at, signum, 0

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), self.signum)
        return super().__call__(x, generator)


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_signal_stops_after_the_step_with_a_checkpoint_and_resume_is_exact(tmp_path: Path, signame: str) -> None:
    import signal

    signum = getattr(signal, signame)
    before = signal.getsignal(signum)
    teacher = tiny_teacher()
    full = train_run(cpu_context(tmp_path / "a"), hint_spec(teacher, 2), tiny_data(augment=True))
    data = tiny_data(augment=True)
    data = replace(data, train_augment=_SignalAtCall(2, signum, data.train_augment))
    with pytest.raises(StopRequested, match="stopped at step 2 of epoch 1"):
        train_run(cpu_context(tmp_path / "b"), hint_spec(teacher, 2), data)
    assert signal.getsignal(signum) is before  # the run's handler is gone again
    ck = load_checkpoint(tmp_path / "b" / "checkpoints" / "hint-seed5.pt")
    assert (ck["epoch"], ck["partial"]["steps"]) == (0, 2)
    resumed = train_run(cpu_context(tmp_path / "b"), hint_spec(teacher, 2, resume=True), tiny_data(augment=True))
    _assert_same_run(full, resumed)


def test_without_resume_a_run_starts_over_and_resume_without_checkpoint_starts_fresh(tmp_path: Path) -> None:
    spec = RunSpec("ce", 1, lambda: CEStep(LightNN(3, width=2, image_size=8)), lambda p: torch.optim.SGD(p, lr=0.1), 1)
    r1 = train_run(cpu_context(tmp_path), replace(spec, resume=True), tiny_data(augment=False))
    r2 = train_run(cpu_context(tmp_path), spec, tiny_data(augment=False))
    assert r1.history[0]["loss"] == r2.history[0]["loss"]  # same seed, same start


class _Evil:
    ran = False

    def __reduce__(self) -> tuple[object, tuple[()]]:
        return (_mark_ran, ())


def _mark_ran() -> None:
    _Evil.ran = True


def test_unsafe_pickle_checkpoint_is_refused_and_not_executed(tmp_path: Path) -> None:
    path = tmp_path / "checkpoints" / "hint-seed5.pt"
    path.parent.mkdir(parents=True)
    torch.save({"format": CHECKPOINT_FORMAT, "payload": _Evil()}, path)
    with pytest.raises(CheckpointError, match=r"refusing to load checkpoint .*weights_only=True"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="refusing"):
        train_run(cpu_context(tmp_path), hint_spec(tiny_teacher(), 1, resume=True), tiny_data(augment=False))
    assert not _Evil.ran
    # nothing was overwritten by the refused run
    with pytest.raises(CheckpointError, match="refusing"):
        load_checkpoint(path)


def test_checkpoint_of_another_model_or_method_is_refused(tmp_path: Path) -> None:
    teacher = tiny_teacher()
    train_run(cpu_context(tmp_path), hint_spec(teacher, 1), tiny_data(augment=False))
    src = tmp_path / "checkpoints" / "hint-seed5.pt"
    os.replace(src, tmp_path / "checkpoints" / "kd-seed5.pt")
    kd = RunSpec(
        "kd",
        5,
        lambda: KDStep(LightNN(3, width=3, image_size=8), temperature=2.0, kd_weight=0.5, ce_weight=0.5),
        lambda p: torch.optim.Adam(p),
        1,
        teacher=TeacherOutputs(teacher),
        resume=True,
    )
    with pytest.raises(CheckpointError, match=r"was written for method 'hint' seed 5 \(HintStep / LightNN\).*'kd'"):
        train_run(cpu_context(tmp_path), kd, tiny_data(augment=False))


def test_truncated_or_foreign_checkpoints(tmp_path: Path) -> None:
    save_checkpoint({"format": CHECKPOINT_FORMAT, "x": torch.ones(1000)}, tmp_path / "c.pt")
    data = (tmp_path / "c.pt").read_bytes()
    (tmp_path / "t.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "t.pt")
    torch.save({"weights": torch.ones(1)}, tmp_path / "f.pt")
    with pytest.raises(CheckpointError, match="not a reference_trainers checkpoint"):
        load_checkpoint(tmp_path / "f.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "results.json"
    atomic_write_bytes(target, b"old")

    def boom(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["results.json"]  # no temp file left behind


def test_teacher_cache_matches_the_online_teacher(tmp_path: Path) -> None:
    teacher = tiny_teacher()
    data = tiny_data(augment=False)
    side = TeacherOutputs(teacher, {"features": "features"})
    cache = teacher_cache(cpu_context(tmp_path), side, data)
    assert cache is not None
    assert set(cache.outputs) == {"logits", "features"}
    x = data.eval_augment(data.train.images)  # type: ignore[attr-defined]
    online = side(x)
    for k in online:
        torch.testing.assert_close(cache.outputs[k], online[k], rtol=1e-5, atol=1e-6)
    assert teacher_cache(cpu_context(tmp_path), side, tiny_data(augment=True)) is None  # random pipeline: no cache
    assert teacher_cache(cpu_context(tmp_path, cache_teacher=False), side, data) is None
    cached = train_run(cpu_context(tmp_path / "c"), hint_spec(teacher, 1), data)
    live = train_run(cpu_context(tmp_path / "l", cache_teacher=False), hint_spec(teacher, 1), data)
    assert cached.teacher_cache_s is not None
    assert live.teacher_cache_s is None
    assert cached.history[0]["loss"] == pytest.approx(live.history[0]["loss"], rel=1e-5)


def test_test_accuracy_is_the_one_selected_on_validation(tmp_path: Path) -> None:
    res = train_run(cpu_context(tmp_path), hint_spec(tiny_teacher(), 3), tiny_data(augment=False))
    vals = [h["val_acc"] for h in res.history]
    best = vals.index(max(vals)) + 1
    assert res.best_epoch == best
    assert res.val_best == max(vals)
    assert res.val_last == vals[-1]
    assert res.test_selected == res.history[best - 1]["test_acc"]
    assert res.test_last == res.history[-1]["test_acc"]
    # the test set is measured only where validation reached a new best, and at the last epoch
    new_best = [v > max(vals[:i], default=-1.0) for i, v in enumerate(vals)]
    measured = [h["test_acc"] is not None for h in res.history]
    assert measured == [nb or i == len(vals) - 1 for i, nb in enumerate(new_best)]


def _fake(method: str, seed: int, acc: float) -> RunResult:
    h = [
        {
            "epoch": 1,
            "loss": 1.0,
            "parts": {},
            "lr": 0.1,
            "time_s": 1.0,
            "images_per_s": 10.0,
            "val_acc": acc,
            "test_acc": acc,
        }
    ]
    return RunResult(method, seed, 1, h, acc, acc, 1, acc, acc, 2.0, 10.0, None)


def test_summary_and_reports(tmp_path: Path) -> None:
    results = [_fake("kd", 0, 0.5), _fake("kd", 1, 0.7), _fake("ce", 0, 0.4)]
    rows = summarise(results)
    assert [r["method"] for r in rows] == ["kd", "ce"]
    assert rows[0]["test_selected_mean"] == pytest.approx(0.6)
    assert rows[0]["test_selected_sd"] == pytest.approx(0.1414213, rel=1e-5)  # sample sd over seeds
    assert rows[1]["test_selected_sd"] is None  # one seed: no spread to report
    paths = write_reports(tmp_path / "out", results, {"recipe": "unit", "data": "fake"})
    doc = json.loads(paths["json"].read_text())
    assert doc["meta"]["recipe"] == "unit"
    assert len(doc["runs"]) == 3
    assert doc["summary"][0]["n"] == 2
    assert "| kd | 0, 1 | 60.00 ± 14.14 |" in paths["md"].read_text()
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["results.json", "results.md", "results.png"]


def test_resume_with_other_epochs_is_refused(tmp_path: Path) -> None:
    teacher = tiny_teacher()
    train_run(cpu_context(tmp_path), hint_spec(teacher, 1), tiny_data(augment=False))
    with pytest.raises(CheckpointError, match="belongs to a run of 1 epochs, this run asks for 2"):
        train_run(cpu_context(tmp_path), hint_spec(teacher, 2, resume=True), tiny_data(augment=False))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_run_with_bf16_autocast_and_channels_last(tmp_path: Path) -> None:
    ctx = Context(TrainConfig(device="cuda", progress=False, out_dir=tmp_path), torch.device("cuda"))
    d = tiny_data(augment=True)
    data = RunData(
        TensorBatches(tiny_split(48, 1), 16, "cuda", shuffle=True, seed=0),
        TensorBatches(tiny_split(16, 2), 64, "cuda"),
        TensorBatches(tiny_split(16, 3), 64, "cuda"),
        TensorAugment(MEAN, STD, crop_padding=2, flip=True, channels_last=True),
        TensorAugment(MEAN, STD, channels_last=True),
    )
    assert d.train_augment.flip
    res = train_run(ctx, hint_spec(tiny_teacher(), 2), data)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in res.history)
    assert next(iter(_state(res).values())).is_cuda


# The layout every earlier version wrote (a dict built in the loop), key for key and in this order:
# the checksum covers the order, so a checkpoint of an earlier version only verifies if it is kept.
_OLD_KEYS = [
    "format", "method", "seed", "signature", "epoch", "epochs", "done", "model", "optimizer", "scheduler", "rng",
    "history", "best", "train_time_s", "images", "run_steps", "teacher_cache_s", "torch",
]  # fmt: skip
_OLD_PARTIAL_KEYS = ["steps", "n_batches", "seen", "sums", "time_s", "aug_gen", "rng", "rng_epoch_start"]


def _as_earlier_versions_wrote_it(ck: dict[str, object]) -> dict[str, object]:
    old = {key: ck[key] for key in _OLD_KEYS}
    old["format"] = "reference_trainers.checkpoint/2"
    old["best"] = {"val": ck["best"]["val"], "epoch": ck["best"]["epoch"], "test": ck["best"]["test"]}  # type: ignore[index]
    if "partial" in ck:
        old["partial"] = {key: ck["partial"][key] for key in _OLD_PARTIAL_KEYS}  # type: ignore[index]
    return old


@pytest.mark.parametrize("stop_step", [3, 4], ids=["end-of-epoch1", "epoch2-step1"])
def test_a_checkpoint_in_the_layout_of_earlier_versions_resumes_exactly(tmp_path: Path, stop_step: int) -> None:
    from reference_trainers.engine import Checkpoint, checkpoint_digest

    teacher = tiny_teacher()
    full = train_run(cpu_context(tmp_path / "a"), hint_spec(teacher, 3), tiny_data(augment=True))
    with pytest.raises(StopRequested, match="continue with --resume"):
        train_run(
            cpu_context(tmp_path / "b", stop_after_step=stop_step), hint_spec(teacher, 3), tiny_data(augment=True)
        )
    path = tmp_path / "b" / "checkpoints" / "hint-seed5.pt"
    written = load_checkpoint(path)
    old = _as_earlier_versions_wrote_it(written)
    assert list(written) == [*old, "checksum"]  # this version writes that layout, in that order...
    assert written["checksum"] == checkpoint_digest(old)  # ...with the same checksum
    assert Checkpoint.from_dict(old).to_dict() == old  # the typed record reads and writes it back unchanged
    torch.save({**old, "checksum": checkpoint_digest(old)}, path)  # a file as an earlier version left it
    resumed = train_run(cpu_context(tmp_path / "b"), hint_spec(teacher, 3, resume=True), tiny_data(augment=True))
    _assert_same_run(full, resumed)


def test_a_malformed_checkpoint_record_is_refused_with_its_path(tmp_path: Path) -> None:
    from reference_trainers.engine import Checkpoint, EpochProgress

    teacher = tiny_teacher()
    with pytest.raises(StopRequested):
        train_run(cpu_context(tmp_path, stop_after_step=4), hint_spec(teacher, 3), tiny_data(augment=False))
    path = tmp_path / "checkpoints" / "hint-seed5.pt"
    ck = load_checkpoint(path)
    record = Checkpoint.from_dict(ck, path)
    assert isinstance(record.partial, EpochProgress)
    assert (record.epoch, record.partial.steps, record.partial.n_batches) == (1, 1, 3)
    assert (record.best.epoch, record.run_steps) == (1, 4)
    broken = {**ck, "partial": {k: v for k, v in ck["partial"].items() if k != "aug_gen"}}
    with pytest.raises(CheckpointError, match=r"'x\.pt' cannot be resumed from \(KeyError: 'aug_gen'\)"):
        Checkpoint.from_dict(broken, "x.pt")
    with pytest.raises(CheckpointError, match=r"'x\.pt' lacks 'history': it is not a run's checkpoint"):
        Checkpoint.from_dict({k: v for k, v in ck.items() if k != "history"}, "x.pt")
    save_checkpoint({k: v for k, v in broken.items() if k != "checksum"}, path)
    with pytest.raises(CheckpointError, match="cannot be resumed from"):
        train_run(cpu_context(tmp_path), hint_spec(teacher, 3, resume=True), tiny_data(augment=False))
