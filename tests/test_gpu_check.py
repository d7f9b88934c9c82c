"""The GPU check (scripts/gpu_check.sh) cannot rot between GPU runs: its CPU rehearsal runs here.

The rehearsal runs every step of the check on the CPU at tiny sizes (the CUDA-only tests are
collected and skipped) and must write a manifest that matches the schema. The orchestration
(time limits, budget, steps that cannot run) is tested with stand-in steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from benchmarks import gpu_check
from benchmarks.gpu_check import SCHEMA, Config, Step, validate

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_rehearsal_runs_every_step_and_writes_a_valid_manifest(tmp_path: Path) -> None:
    env = dict(os.environ, GPU_CHECK_REHEARSAL="1", PYTHON=sys.executable, OUT="")
    cmd = ["bash", "scripts/gpu_check.sh", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "out" / "gpu-check.json").read_text())
    assert validate(manifest) == []
    assert manifest["rehearsal"] is True
    assert manifest["device"] == "cpu"
    assert [s["name"] for s in manifest["steps"]] == list(gpu_check.STEP_NAMES)
    assert {s["status"] for s in manifest["steps"]} == {"ok"}
    tests = manifest["tests_gpu"]
    assert tests["skipped"] > 0
    assert tests["passed"] == 0
    assert tests["failed"] == 0
    assert {r["impl"] for r in manifest["kernels"]} == {"kdloss", "naive", "compiled"}
    assert all(r["median_s"] > 0 for r in manifest["kernels"])
    assert [r["batch"] for r in manifest["crd"]] == [16]
    assert [r["config"] for r in manifest["trainer_step"]] == ["plain fp32 b64", "engine online", "engine cached"]
    seeds_phases = {(r["seed"], r["phase"]) for r in manifest["tutorial"]}
    assert seeds_phases == {(s, p) for s in (42, 0, 1) for p in ("teacher", "student-ce", "kd")}
    # per decode mode: the training source alone (no model), then the run
    hint = [(r["decode"], r["method"]) for r in manifest["hint_imagenette"]]
    assert hint == [(d, m) for d in ("device", "cpu") for m in ("data only (no model)", "hint-faithful")]
    assert all(r["img_per_s"] > 0 for r in manifest["hint_imagenette"])
    assert {(r["case"], r["impl"]) for r in manifest["fused_linear"]} == {
        ("tiny-float32", i) for i in ("fused", "naive")
    }
    assert all(r["median_s"] > 0 and r["peak_bytes"] > 0 for r in manifest["fused_linear"])
    # every target is listed with a figure, met or not (a rehearsal measures nothing about a GPU)
    assert any(t["target"].startswith("CRD step B=64") for t in manifest["targets"])
    assert any(t["target"].startswith("fused linear KD lm128k") for t in manifest["targets"])
    md = (tmp_path / "out" / "gpu-check.md").read_text()
    assert "CPU rehearsal" in md
    assert "## Targets" in md
    with tarfile.open(tmp_path / "out" / "gpu-check-logs.tar.gz") as tar:
        assert "kernels.log" in tar.getnames()


def _config(tmp_path: Path, budget: float = 60.0) -> Config:
    return Config(True, tmp_path / "out", tmp_path / "work", budget, None, "abc123", [])


def _steps(*steps: Step) -> list[Step]:
    env = Step("env", 30, [[sys.executable, "-c", "pass"]])
    return [env, *steps]


def test_time_limit_failure_and_skip_are_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    steps = _steps(
        Step("tests_gpu", 1, [[sys.executable, "-c", "import time; time.sleep(30)"]]),  # stopped at its limit
        Step("kernels", 30, [[sys.executable, "-c", "raise SystemExit(3)"]]),  # fails
        Step("crd", 30, [], skip="no data here"),  # cannot run
    )
    monkeypatch.setattr(gpu_check, "plan", lambda cfg: steps)
    cfg = _config(tmp_path)
    assert gpu_check.run_check(cfg) == 1
    m = json.loads((cfg.out / "gpu-check.json").read_text())
    assert validate(m) == []
    status = {s["name"]: (s["status"], s["rc"]) for s in m["steps"]}
    assert status == {
        "env": ("ok", 0),
        "tests_gpu": ("timeout", 124),
        "kernels": ("failed", 3),
        "crd": ("not run", None),
    }
    assert {s["name"]: s["note"] for s in m["steps"]}["crd"] == "no data here"
    # nothing measured: every target is listed as not measured, none invented
    assert m["targets"]
    assert all(t["passed"] is None for t in m["targets"])
    assert "| tests_gpu | timeout | 124 |" in (cfg.out / "gpu-check.md").read_text()


def test_steps_that_do_not_fit_the_budget_are_recorded_as_not_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps = _steps(
        Step("tests_gpu", 30, [[sys.executable, "-c", "import time; time.sleep(1.5)"]]),
        Step("kernels", 30, [[sys.executable, "-c", "pass"]]),
    )
    monkeypatch.setattr(gpu_check, "plan", lambda cfg: steps)
    monkeypatch.setattr(gpu_check, "MIN_STEP_S", 2.0)
    cfg = _config(tmp_path, budget=3.0)
    assert gpu_check.run_check(cfg) == 1
    m = json.loads((cfg.out / "gpu-check.json").read_text())
    status = {s["name"]: s["status"] for s in m["steps"]}
    assert status == {"env": "ok", "tests_gpu": "ok", "kernels": "not run"}
    assert "budget of 3 s was used up" in m["steps"][2]["note"]
    assert m["steps"][1]["limit_s"] <= 3.0  # a step's limit is cut to what is left of the budget


def test_a_timed_out_step_ends_its_child_processes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pid_file = tmp_path / "child.pid"
    code = (
        "import subprocess, sys, time; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)"
    )
    monkeypatch.setattr(gpu_check, "plan", lambda cfg: _steps(Step("kernels", 2, [[sys.executable, "-c", code]])))
    gpu_check.run_check(_config(tmp_path))
    pid = int(pid_file.read_text())
    for _ in range(50):  # the kill is sent; give the kernel a moment to end it
        if not _alive(pid):
            break
        time.sleep(0.1)
    assert not _alive(pid)


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def test_the_manifest_is_written_before_the_first_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, object]] = []
    out = tmp_path / "out" / "gpu-check.json"
    probe = [sys.executable, "-c", f"import json; print(json.load(open({str(out)!r}))['steps'][1]['status'])"]

    def plan(cfg: Config) -> list[Step]:
        return _steps(Step("kernels", 30, [probe]))

    monkeypatch.setattr(gpu_check, "plan", plan)
    cfg = _config(tmp_path)
    gpu_check.run_check(cfg)
    seen.append(json.loads(out.read_text()))
    log = (cfg.res / "kernels.log").read_text()
    assert "running" in log  # the step saw its own record, written before it started
    assert seen[0]["steps"][1]["status"] == "ok"  # type: ignore[index]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.pop("kernels"), "missing field 'kernels'"),
        (lambda m: m.update(schema="other/1"), "field 'schema' must be"),
        (lambda m: m.update(wall_s="fast"), "field 'wall_s' must be"),
        (lambda m: m["steps"].append({"name": "env", "status": "done"}), "is missing 'rc'"),
        (lambda m: m["steps"][0].update(status="done"), "has status 'done'"),
        (lambda m: m["crd"].append({"batch": 64, "kdloss_ms": "1"}), "crd[0].kdloss_ms"),
        (lambda m: m["targets"].insert(0, {"target": "x", "value": "1", "passed": 1}), "targets[0].passed"),
    ],
)
def test_validate_names_what_is_wrong(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change, message) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(gpu_check, "plan", lambda cfg: _steps())
    cfg = _config(tmp_path)
    gpu_check.run_check(cfg)
    m = json.loads((cfg.out / "gpu-check.json").read_text())
    assert validate(m) == []
    assert m["schema"] == SCHEMA
    change(m)
    assert any(message in p for p in validate(m)), validate(m)


def test_validate_command_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    assert gpu_check.main(["validate", str(bad)]) == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--cifar10", "/nonexistent/cifar10-jpeg.tar.gz", "--rehearsal"], "does not exist"),
        (["--only", "kernels,warp", "--rehearsal"], "unknown step"),
        (["--budget", "0", "--rehearsal"], "--budget must be > 0"),
    ],
)
def test_bad_invocations_exit_2_with_a_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        gpu_check.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_extract_accepts_the_archive_or_its_folder(tmp_path: Path) -> None:
    archive = tmp_path / "tiny.tar.gz"
    assert gpu_check.cmd_tiny_cifar10(str(archive), per_class=1, test_per_class=1) == 0
    assert gpu_check.cmd_extract(str(archive), str(tmp_path / "a")) == 0
    assert len(list((tmp_path / "a" / "train").glob("*/*.jpg"))) == 10
    assert gpu_check.cmd_extract(str(tmp_path / "a"), str(tmp_path / "b")) == 0  # a folder is linked
    assert (tmp_path / "b" / "test").is_dir()
    with pytest.raises(SystemExit, match="has no train/"):
        gpu_check.cmd_extract(str(tmp_path), str(tmp_path / "c"))


def test_figures_recorded_by_tests_reach_the_manifest(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    cfg.res.mkdir(parents=True)
    (cfg.res / "tests_gpu.xml").write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_kernel_verify" name="test_self_check_cost_on_gpu">'
        '<properties><property name="self_check_ms/soft_kl/float32" value="median 3.10, max 4.00 (x)"/>'
        '<property name="self_check_ms/cohort/bfloat16" value="median 7.50, max 9.00 (x)"/></properties>'
        "</testcase>"
        '<testcase classname="t" name="broken"><failure message="boom"/></testcase>'
        '<testcase classname="t" name="skipped"><skipped message="no cuda"/></testcase>'
        "</testsuite></testsuites>"
    )
    meta = {"command": "x", "budget_s": 1.0, "commit": "c", "rehearsal": True}
    env = {"name": "env", "status": "ok", "rc": 0, "wall_s": 1.0, "limit_s": 30, "note": ""}
    m = gpu_check.build_manifest(cfg, meta, [env], 0.0)
    assert validate(m) == []
    tests = m["tests_gpu"]
    assert (tests["passed"], tests["failed"], tests["skipped"]) == (1, 1, 1)
    assert tests["failures"] == ["t::broken"]
    verdicts = {t["target"]: (t["value"], t["passed"]) for t in m["targets"] if "self-check" in t["target"]}
    assert verdicts == {
        "kernel self-check soft_kl/float32 <= 5 ms": ("3.10 ms", True),
        "kernel self-check cohort/bfloat16 <= 5 ms": ("7.50 ms", False),
    }
