"""``python -m reference_trainers lm-distil``: smoke runs on CPU, teacher reuse, resume, the steps, bad input."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import kdloss
from reference_trainers.__main__ import main
from reference_trainers.errors import TrainerError
from reference_trainers.methods import FusedLinearOptions, LMFusedKDStep, LMSparseKDStep, TeacherTopKSide
from reference_trainers.methods.fused_linear import DIVERGENCE_OF, LM_METHODS, make_lm_method
from reference_trainers.models.causal_lm import CausalLM, LMConfig
from reference_trainers.recipes import lm_distil
from reference_trainers.recipes.lm_distil import METHODS, load_corpus, windows
from tests.naive.fused_linear import lm_kd

FAST = ["--smoke", "--device", "cpu", "--no-progress", "--threads", "1"]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lm") / "run"
    assert main(["lm-distil", *FAST, "--out", str(out)]) == 0
    return out


def _lm_rows(out: Path) -> dict[str, dict[str, float]]:
    doc = json.loads((out / "results.json").read_text())
    return {r["method"]: r for r in doc["meta"]["lm"]}


def test_smoke_run_writes_the_reports_checkpoints_and_store(smoke_run: Path) -> None:
    doc = json.loads((smoke_run / "results.json").read_text())
    assert [r["method"] for r in doc["runs"]] == ["teacher", *METHODS]
    rows = _lm_rows(smoke_run)
    assert list(rows) == ["teacher", *METHODS]
    for method, r in rows.items():
        assert 1.0 < r["val_perplexity"] < 300.0, (method, r)  # at most a little worse than uniform over bytes
        assert 1.0 < r["test_perplexity"] < 300.0, (method, r)
        assert (r["test_kl_to_teacher"] is None) == (method == "teacher")
    md = (smoke_run / "results.md").read_text()
    assert "## Perplexity (each model after its last epoch)" in md
    assert "| kd-jsd | 42 | 1 |" in md
    assert (smoke_run / "results.png").stat().st_size > 0
    for method in ("teacher", *METHODS):
        assert (smoke_run / "checkpoints" / f"{method}-seed42.pt").is_file()
    store = kdloss.TeacherTopK(smoke_run / "teacher-topk-seed42")
    assert store.k == 16
    assert store.vocab_size == 256
    assert len(store) % 32 == 0  # whole training windows of the smoke context
    assert store.metadata["split"] == "train"
    assert doc["meta"]["student_config"]["d_model"] == 16


def test_a_resumed_run_reuses_everything(smoke_run: Path) -> None:
    before = _lm_rows(smoke_run)
    store_time = (smoke_run / "teacher-topk-seed42" / "meta.json").stat().st_mtime_ns
    assert main(["lm-distil", *FAST, "--out", str(smoke_run), "--resume"]) == 0
    after = _lm_rows(smoke_run)
    for method in before:
        assert after[method]["test_perplexity"] == pytest.approx(before[method]["test_perplexity"], rel=1e-6)
    assert (smoke_run / "teacher-topk-seed42" / "meta.json").stat().st_mtime_ns == store_time  # not rewritten


def test_a_corrupt_store_is_written_again_on_resume(
    smoke_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "copy"
    shutil.copytree(smoke_run, out)
    lp = out / "teacher-topk-seed42" / "logprobs.bin"
    with open(lp, "r+b") as f:
        f.seek(16)
        f.write(b"\xff\xff\xff\x7f")  # a NaN where a log-probability was; the file size is unchanged
    assert main(["lm-distil", *FAST, "--out", str(out), "--resume"]) == 0
    assert "does not match its checksum" in capsys.readouterr().err
    kdloss.TeacherTopK(out / "teacher-topk-seed42").verify()  # rewritten whole
    assert lp.read_bytes() == (smoke_run / "teacher-topk-seed42" / "logprobs.bin").read_bytes()


def test_a_teacher_checkpoint_is_loaded_not_trained(smoke_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "reuse"
    ckpt = smoke_run / "checkpoints" / "teacher-seed42.pt"
    argv = ["lm-distil", *FAST, "--out", str(out), "--methods", "kd-forward", "--teacher-checkpoint", str(ckpt)]
    assert main(argv) == 0
    rows = _lm_rows(out)
    assert list(rows) == ["teacher (checkpoint)", "kd-forward"]
    assert rows["teacher (checkpoint)"]["test_perplexity"] == pytest.approx(
        _lm_rows(smoke_run)["teacher"]["test_perplexity"], rel=1e-6
    )
    assert not (out / "checkpoints" / "teacher-seed42.pt").exists()
    assert [r["method"] for r in json.loads((out / "results.json").read_text())["runs"]] == ["kd-forward"]


def test_own_corpus_and_temperature(tmp_path: Path) -> None:
    corpus = tmp_path / "text.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    out = tmp_path / "own"
    argv = ["lm-distil", *FAST, "--out", str(out), "--corpus", str(corpus), "--methods", "kd-topk,kd-tv"]
    assert main([*argv, "--temperature", "2", "--context", "16"]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert "1 file(s)" in doc["meta"]["data"]
    assert doc["meta"]["teacher_config"]["context"] == 16
    assert set(_lm_rows(out)) == {"teacher", "kd-topk", "kd-tv"}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--methods", "kd-forward,kd-kl"], "unknown method(s) ['kd-kl']"),
        (["--data-root", "/tmp"], "lm-distil reads a text corpus (--corpus): --data-root describe image data"),
        (["--kd-weight", "0"], "--kd-weight must lie in (0, 1]"),
        (["--jsd-weight", "1"], "--jsd-weight must lie in (0, 1), got 1.0"),
        (["--corpus", "/nonexistent/corpus"], "--corpus: '/nonexistent/corpus' does not exist"),
        (["--teacher-checkpoint", "/nonexistent.pt"], "--teacher-checkpoint: '/nonexistent.pt' does not exist"),
        (["--topk", "300"], "--topk must lie in [1, 256]"),
    ],
)
def test_bad_input_exits_2_with_a_message(
    extra: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["lm-distil", *FAST, "--out", str(tmp_path / "bad"), *extra]) == 2
    assert message in capsys.readouterr().err


def test_a_checkpoint_of_another_model_is_refused(
    smoke_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = smoke_run / "checkpoints" / "student-ce-seed42.pt"  # a student: other sizes than the teacher
    argv = ["lm-distil", *FAST, "--out", str(tmp_path / "x"), "--methods", "kd-tv", "--teacher-checkpoint", str(ckpt)]
    assert main(argv) == 2
    assert "does not hold an lm-distil teacher" in capsys.readouterr().err


def test_corpus_windows_predict_the_next_byte() -> None:
    tokens = torch.arange(11, dtype=torch.uint8)
    split = windows(tokens, 4)
    assert split.images.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert split.labels.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    data, files = load_corpus(Path(__file__).resolve().parent.parent / "docs")
    assert len(files) > 5
    assert data.dtype == torch.uint8


def test_the_fused_step_is_the_kd_objective_on_the_logits() -> None:
    """LMFusedKDStep's loss = kd_weight * T^2 * KL + ce_weight * CE on the materialised logits."""
    torch.manual_seed(0)
    cfg = LMConfig(vocab_size=256, context=8, d_model=8, n_layers=1, n_heads=2, dropout=0.0)
    student, teacher = CausalLM(cfg), CausalLM(LMConfig(**{**cfg.to_dict(), "d_model": 12}))  # type: ignore[arg-type]
    loss = kdloss.FusedLinearKDLoss(2.0, divergence="jsd", hard_weight=0.3, soft_weight=0.7)
    step = LMFusedKDStep(student, teacher.head.weight, loss)
    x = torch.randint(0, 256, (3, 8))
    y = torch.randint(0, 256, (3, 8))
    t_hidden = teacher.hidden(x).detach()
    got = step(x, y, {"hidden": t_hidden}).total
    want = lm_kd(
        student.hidden(x), student.head.weight, t_hidden, teacher.head.weight, y,
        temperature=2.0, divergence="jsd", hard_weight=0.3, soft_weight=0.7,
    )  # fmt: skip
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert "teacher_weight" not in step.state_dict()  # the teacher's weight is not the student's to checkpoint


def test_the_sparse_step_reads_the_online_teacher_side() -> None:
    torch.manual_seed(1)
    cfg = LMConfig(vocab_size=256, context=8, d_model=8, n_layers=1, n_heads=2, dropout=0.0)
    student, teacher = CausalLM(cfg), CausalLM(cfg)
    side = TeacherTopKSide(teacher, 5)
    x, y = torch.randint(0, 256, (2, 8)), torch.randint(0, 256, (2, 8))
    t_out = side(x)
    step = LMSparseKDStep(student, kdloss.SparseKDLoss(hard_weight=0.5, soft_weight=0.5), use_tail=True)
    got = step(x, y, t_out).total
    logits = student(x)
    want = 0.5 * kdloss.functional.sparse_kd(
        logits, t_out["logprobs"], t_out["indices"], teacher_tail=t_out["tail"]
    ) + 0.5 * F.cross_entropy(logits.flatten(0, 1), y.flatten())
    torch.testing.assert_close(got, want)


def test_the_recipe_runs_the_methods_built_in_methods_fused_linear() -> None:
    assert METHODS is LM_METHODS
    assert lm_distil.DIVERGENCE_OF is DIVERGENCE_OF
    cfg = LMConfig(vocab_size=256, context=8, d_model=8, n_layers=1, n_heads=2, dropout=0.0)
    teacher = CausalLM(cfg)
    opts = FusedLinearOptions(temperature=2.0)
    steps = {m: make_lm_method(m, cfg, teacher, opts) for m in LM_METHODS}
    assert steps["student-ce"].teacher is None
    assert type(steps["kd-topk"].teacher) is TeacherTopKSide
    assert type(steps["kd-topk"].build()) is LMSparseKDStep
    assert not steps["kd-topk"].build().use_tail  # type: ignore[attr-defined]  # T != 1: the tail is not used
    fused = steps["kd-jsd"].build()
    assert type(fused) is LMFusedKDStep
    assert (fused.loss.divergence, fused.loss.jsd_weight) == ("jsd", 0.5)  # type: ignore[union-attr]
    with pytest.raises(TrainerError, match="unknown language-model method 'kd-kl'; choose from student-ce, "):
        make_lm_method("kd-kl", cfg, teacher, opts)


def test_the_clis_defaults_are_the_typed_options() -> None:
    from reference_trainers.__main__ import build_parser

    args = build_parser().parse_args(["lm-distil"])
    opts = FusedLinearOptions()
    assert (args.temperature, args.kd_weight, args.jsd_weight, args.topk) == (
        opts.temperature,
        opts.kd_weight,
        opts.jsd_weight,
        opts.topk,
    )
