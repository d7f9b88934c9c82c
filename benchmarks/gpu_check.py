"""The one GPU check: every GPU figure kdloss states, taken by one command in at most 9 minutes.

On a machine with one CUDA GPU (H100/H200) and torch, torchvision and triton installed, from the
repository root::

    bash scripts/gpu_check.sh --cifar10 PATH/cifar10-jpeg.tar.gz      # or KDLOSS_CIFAR10=PATH

The CPU rehearsal (the same steps at tiny sizes, the CUDA-only tests skipped; run in CI)::

    GPU_CHECK_REHEARSAL=1 bash scripts/gpu_check.sh

Steps, in order of value, each under its own time limit and all under one budget (``--budget``,
540 s by default); a step that does not fit what is left is recorded as not run:

1. ``env``: GPU name, driver, torch / triton / torchvision / CUDA versions, commit;
2. ``tests_gpu``: ``pytest -m gpu`` (every kernel against eager at benchmark sizes, the in-launch
   reduction under repeated calls and CUDA graphs, no host synchronisation);
3. ``kernels``: ``benchmarks.run_gpu`` at the logit sizes 256x100 fp32, 4096x1000 fp32/bf16,
   8192x32000 bf16, 4096x128256 bf16 for ``kd`` and ``kd_ce`` (kdloss / naive / torch.compile),
   then the targets of ``benchmarks.check_targets``;
4. ``crd``: one CRD step at B = 64 and 256, K = 16384, d = 128, n = 50,000 against the textbook
   step of ``tests/naive/contrastive.py``, interleaved in one process;
5. ``trainer_step``: resnet32x4 -> resnet8x4 student steps, bf16, online teacher and cached
   logits, beside a plain fp32 batch-64 loop (``benchmarks/test_bench_trainer_step.py``);
6. ``tutorial``: ``tutorial-cifar10`` phases 1-3, seeds 42, 0, 1, on the CIFAR-10 JPEG archive
   (trained on all 50,000 images like the source loop, ``--val-size 0``);
7. ``hint_imagenette``: ``hint-imagenette --faithful`` (the source's loop: no teacher fine-tuning),
   5 epochs on a synthetic tree of Imagenette's shape, JPEGs decoded on the device; first the
   training source alone for 8 s (``data-rate``: images/s without any model), to tell whether a
   slow run waits for its data or for its models;
8. ``hint_imagenette_cpu``: the same with the JPEGs decoded by the CPU workers;
9. ``fused_linear`` (optional, last: ``--only fused_linear`` runs it alone): ``fused_linear_kd``
   against the materialised logits, ``torch.compile`` of them and Liger-Kernel's fused linear
   JSD when installed, at 4096 x 32,000 x 1,024 fp32 and 8192 x 128,256 x 4,096 bf16 on the GPU,
   and at the first size on the host's CPU (``benchmarks/bench_fused_linear.py``; targets in
   ``benchmarks/fused_linear_targets.py``).

After every step the manifest ``gpu-check.json`` and its tables ``gpu-check.md`` are rewritten
atomically in ``--out`` (default ``$OUT`` when set, else ``runs/gpu-check``), with the step logs
packed into ``gpu-check-logs.tar.gz``: a run cut short keeps what it measured. The targets are read
from the manifest and reported with their figures; a missed target never fails the check. The
exit status is 0 when every step ran and succeeded, 1 otherwise, 2 for a bad invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks import fused_linear_targets

SCHEMA = "kdloss-gpu-check/1"
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BUDGET_S = 540.0
MIN_STEP_S = 15.0  # a step is not started with less than this left of the budget

# The published bars these figures are read against (the source loop of the PyTorch KD tutorial as
# measured on the JPEG CIFAR-10 on one H100: teacher 72.7 %, student CE 69.4 %, KD 69.4 %, means of
# seeds 42 / 0 / 1), and the speed targets kdloss set itself.
TUTORIAL_SOURCE_ACC = {"teacher": 72.7, "student-ce": 69.4, "kd": 69.4}
TUTORIAL_PHASES = ("teacher", "student-ce", "kd")
TUTORIAL_SEEDS = (42, 0, 1)
TUTORIAL_MAX_S_PER_SEED = 8.0
CRD_MAX_MS = {64: 0.47, 256: 1.1}
TRAINER_MIN_IMG_S = {"engine online": 40_000.0, "engine cached": 90_000.0}
IMAGENETTE_MAX_S = 12.0
IMAGENETTE_SHAPE = {"train": 9469, "val": 3925, "short_side": 320}


# ----------------------------------------------------------------------------------------- the plan


@dataclass
class Step:
    """One step: commands run in sequence under one time limit; ``skip`` says why it cannot run."""

    name: str
    limit_s: float
    commands: list[list[str]]
    skip: str | None = None
    keep_going: bool = False  # run the later commands after a failed one (the rc is the first failure's)


@dataclass
class Config:
    rehearsal: bool
    out: Path
    work: Path
    budget_s: float
    cifar10: Path | None
    commit: str
    only: list[str] = field(default_factory=list)
    argv: list[str] = field(default_factory=list)

    @property
    def res(self) -> Path:
        return self.work / "results"


def _py(*args: str) -> list[str]:
    return [sys.executable, *args]


def _have(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def plan(cfg: Config) -> list[Step]:
    """The steps in order of value, with GPU sizes or (rehearsal) tiny CPU sizes."""
    r, res, work = cfg.rehearsal, cfg.res, cfg.work
    dev = ["--device", "cpu"] if r else ["--device", "cuda"]
    steps: list[Step] = [Step("env", 30, [_py("-m", "benchmarks.gpu_check", "env", str(res / "env.json"))])]

    tests = _py("-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", f"--junitxml={res / 'tests_gpu.xml'}")
    if not r and _have("xdist"):
        tests += ["-n", "4"]
    tests_cmds = [[*tests, "tests", "benchmarks"]]
    if not r:  # on CUDA the kernel test files run the real kernels against eager (on CPU: the interpreter, in CI)
        kernel_files = [f"tests/{f}.py" for f in ("test_kernels", "test_cohort_kernel", "test_attention_kernel")]
        kernel_tests = [
            t if not t.startswith("--junitxml") else f"--junitxml={res / 'tests_kernels.xml'}" for t in tests
        ]
        kernel_tests[kernel_tests.index("gpu")] = "not gpu"
        tests_cmds.append([*kernel_tests, "-k", "not interpret", *kernel_files, "tests/test_kernel_verify.py"])
    steps.append(Step("tests_gpu", 150, tests_cmds, keep_going=True))

    kernels = _py("-m", "benchmarks.run_gpu", "--tag", "gpu-check", "--out-dir", str(res), "--families", "kd,kd_ce")
    if r:
        kernels += [
            "--device",
            "cpu",
            "--sizes",
            "cifar100",
            "--families",
            "kd",
            "--reps",
            "3",
            "--warmup",
            "1",
            "--max-sets",
            "2",
        ]
    else:
        kernels += ["--sizes", "cifar100,imagenet,lm32k,lm128k", "--reps", "100", "--warmup", "10"]
    steps.append(Step("kernels", 150, [kernels]))

    crd = _py("benchmarks/test_bench_crd.py", *dev, "--json", str(res / "crd.json"))
    if r:
        crd += ["--threads", "1", "--batch", "16", "--k", "256", "--feat-dim", "32", "--n-data", "2048"]
        crd += ["--in-dim", "64", "--reps", "2", "--rounds", "1"]
    else:
        crd += ["--batch", "64", "256", "--k", "16384", "--feat-dim", "128", "--n-data", "50000", "--reps", "30"]
    steps.append(Step("crd", 40, [crd]))

    trainer = _py("benchmarks/test_bench_trainer_step.py", *dev, "--json", str(res / "trainer_step.json"))
    if r:
        trainer += ["--teacher", "resnet8", "--student", "resnet8", "--classes", "10", "--size", "16"]
        trainer += ["--batch", "8", "--images", "16", "--steps", "1", "--rounds", "1", "--warmup", "1"]
    else:
        trainer += ["--batch", "64", "512", "--steps", "40", "--rounds", "5", "--warmup", "10"]
    steps.append(Step("trainer_step", 50, [trainer]))

    data = work / "cifar10-jpeg"
    tutorial: list[list[str]] = []
    skip = None
    archive = cfg.cifar10
    if r and archive is None:
        archive = work / "tiny-cifar10-jpeg.tar.gz"
        tutorial.append(_py("-m", "benchmarks.gpu_check", "tiny-cifar10", str(archive)))
    if archive is None:
        skip = (
            "no CIFAR-10 JPEG archive: pass --cifar10 PATH (cifar10-jpeg.tar.gz or its extracted folder) "
            "or set KDLOSS_CIFAR10"
        )
    else:
        tutorial.append(_py("-m", "benchmarks.gpu_check", "extract", str(archive), str(data)))
    tut = _py("-m", "reference_trainers", "tutorial-cifar10", "--data-root", str(data), *dev, "--no-progress")
    tut += ["--seeds", ",".join(map(str, TUTORIAL_SEEDS)), "--phases", ",".join(TUTORIAL_PHASES), "--val-size", "0"]
    tut += ["--out", str(res / "tutorial"), "--overwrite"]
    tut += ["--epochs", "1", "--threads", "2"] if r else ["--workers", "8"]
    tutorial.append(tut)
    steps.append(Step("tutorial", 170, tutorial, skip))

    tree = work / "imagenette-synthetic"
    n_train, n_val, side = (40, 20, 40) if r else tuple(IMAGENETTE_SHAPE.values())
    make_tree = _py("-m", "benchmarks.gpu_check", "synthetic-tree", str(tree), str(n_train), str(n_val), str(side))
    for name, decode in (("hint_imagenette", "device"), ("hint_imagenette_cpu", "cpu")):
        hint = _py("-m", "reference_trainers", "hint-imagenette", "--data-root", str(tree), *dev, "--no-progress")
        hint += [
            "--random-init",
            "--lr",
            "0.001",  # timing only: random weights can diverge at the default 0.01, and the engine stops then
            "--faithful",
            "--epochs",
            "5",
            "--seeds",
            "42",
            "--out",
            str(res / name),
            "--overwrite",
        ]
        if r:
            hint += ["--image-size", "32", "--batch-size", "8", "--workers", "0", "--decode", "cpu", "--epochs", "1"]
            rate = ["cpu", "cpu", "0", "8", "32", "2"]
        else:
            hint += ["--workers", "12", "--decode", decode]
            rate = [decode, "cuda", "12", "32", "224", "8"]  # the recipe's default batch size and image size
        # the training source alone first: whether a slow run waits for its data or for its models
        data_rate = _py("-m", "benchmarks.gpu_check", "data-rate", str(tree), *rate, str(res / f"{name}-data.json"))
        steps.append(Step(name, 125 if decode == "device" else 85, [make_tree, data_rate, hint]))

    fused = _py("benchmarks/bench_fused_linear.py", *dev, "--json", str(res / "fused_linear.json"))
    if r:  # one process at a tiny size, no torch.compile (its C++ build alone would take longer than the step)
        fused += ["--sizes", "tiny", "--impls", "fused,naive", "--reps", "1", "--warmup", "0", "--threads", "1"]
        steps.append(Step("fused_linear", 150, [fused]))
    else:  # then the host's CPU at lm32k (the CPU memory and time targets)
        fused_cpu = _py("benchmarks/bench_fused_linear.py", "--device", "cpu", "--sizes", "lm32k", "--impls")
        fused_cpu += ["fused,naive", "--reps", "3", "--warmup", "0", "--json", str(res / "fused_linear_cpu.json")]
        steps.append(Step("fused_linear", 150, [fused, fused_cpu]))
    if cfg.only:
        steps = [s for s in steps if s.name in cfg.only or s.name == "env"]
    return steps


# ---------------------------------------------------------------------------------------- running


def _run_one(argv: list[str], log: Path, timeout: float) -> int:
    """Run ``argv`` in its own process group (so a timeout ends its workers too); 124 on timeout."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")
    with log.open("ab") as f:
        f.write(f"$ {' '.join(argv)}\n".encode())
        f.flush()
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            return proc.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
            f.write(f"\n[gpu_check] stopped at its time limit of {timeout:.0f} s\n".encode())
            return 124


def run_check(cfg: Config) -> int:
    cfg.res.mkdir(parents=True, exist_ok=True)
    cfg.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    steps = plan(cfg)
    records: list[dict[str, Any]] = [
        {"name": s.name, "status": "pending", "rc": None, "wall_s": None, "limit_s": s.limit_s, "note": ""}
        for s in steps
    ]
    prefix = "GPU_CHECK_REHEARSAL=1 " if cfg.rehearsal else ""
    meta = {
        "command": prefix + " ".join(["bash scripts/gpu_check.sh", *cfg.argv]),
        "budget_s": cfg.budget_s,
        "commit": cfg.commit,
        "rehearsal": cfg.rehearsal,
    }
    write_outputs(cfg, meta, records, started)
    for step, rec in zip(steps, records):
        left = cfg.budget_s - (time.monotonic() - started)
        if step.skip:
            rec.update(status="not run", note=step.skip)
            print(f"[gpu_check] {step.name}: not run ({step.skip})", flush=True)
        elif left < MIN_STEP_S:
            rec.update(status="not run", note=f"the budget of {cfg.budget_s:.0f} s was used up")
            print(f"[gpu_check] {step.name}: not run (budget used up)", flush=True)
        else:
            limit = min(step.limit_s, left)
            rec.update(status="running", limit_s=round(limit, 1))
            write_outputs(cfg, meta, records, started)  # a run killed now still says which step it was in
            print(f"[gpu_check] {step.name}: limit {limit:.0f} s", flush=True)
            log = cfg.res / f"{step.name}.log"
            t0 = time.monotonic()
            rc = 0
            for argv in step.commands:
                rc_i = _run_one(argv, log, limit - (time.monotonic() - t0))
                rc = rc or rc_i
                if rc_i == 124 or (rc_i != 0 and not step.keep_going):
                    break
            wall = time.monotonic() - t0
            status = "ok" if rc == 0 else ("timeout" if rc == 124 else "failed")
            note = "" if rc == 0 else _tail(log, 6)
            rec.update(status=status, rc=rc, wall_s=round(wall, 1), note=note)
            print(f"[gpu_check] {step.name}: {status} (rc {rc}) in {wall:.1f} s", flush=True)
        write_outputs(cfg, meta, records, started)
    manifest = write_outputs(cfg, meta, records, started)
    print(markdown(manifest))
    return 0 if all(r["status"] == "ok" for r in records) else 1


def _tail(path: Path, n: int) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])[-800:]


# ------------------------------------------------------------------------------ the manifest


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _env(res: Path, meta: dict[str, Any]) -> dict[str, Any]:
    env = _load(res / "env.json") or {}
    keys = ("device", "driver", "torch", "triton", "torchvision", "python", "cuda")
    out = {k: env.get(k) for k in keys}
    out["device"] = out["device"] or "unknown (the env step did not run)"
    out["commit"] = meta["commit"]
    return out


def _tests(res: Path) -> dict[str, Any] | None:
    """Counts over ``tests_gpu.xml`` (``-m gpu``) and ``tests_kernels.xml`` (the kernel files on CUDA)."""
    roots = []
    for path in (res / "tests_gpu.xml", res / "tests_kernels.xml"):
        try:
            roots.append(ET.parse(path).getroot())
        except (OSError, ET.ParseError):
            continue
    if not roots:
        return None
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    failures: list[str] = []
    properties: list[dict[str, str]] = []
    for case in (c for root in roots for c in root.iter("testcase")):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        for prop in case.iter("property"):  # figures a test records (record_property), e.g. self_check_ms/...
            properties.append({"test": name, "name": prop.get("name", ""), "value": prop.get("value", "")})
        if case.find("failure") is not None or case.find("error") is not None:
            counts["failed"] += 1
            failures.append(name)
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return {**counts, "failures": failures, "properties": properties}


def _kernels(res: Path) -> tuple[list[dict[str, Any]], float | None, list[dict[str, Any]]]:
    doc = _load(res / "results-gpu-check.json")
    if not doc:
        return [], None, []
    rows = doc.get("results", [])
    base = {(r["case"], r["mode"], r["impl"]): r["median_s"] for r in rows}
    out = []
    for r in rows:
        naive = base.get((r["case"], r["mode"], "naive"))
        comp = base.get((r["case"], r["mode"], "compiled"))
        out.append(
            {
                "case": r["case"],
                "shape": r["shape"],
                "dtype": r["dtype"],
                "mode": r["mode"],
                "impl": r["impl"],
                "median_s": r["median_s"],
                "pct_of_floor": r["pct_of_floor"],
                "x_naive": naive / r["median_s"] if naive else None,
                "x_compiled": comp / r["median_s"] if comp else None,
                "peak_extra_bytes": r.get("peak_extra_bytes"),
                "device_ops": r.get("device_ops"),
                "host_sync": r.get("host_sync"),
            }
        )
    from benchmarks.check_targets import checks

    targets = [{"target": d, "value": v, "passed": ok} for d, ok, v in checks(doc)]
    return out, doc.get("meta", {}).get("bandwidth_GBps"), targets


def _crd(res: Path) -> list[dict[str, Any]]:
    doc = _load(res / "crd.json") or {}
    return [
        {
            "batch": r["batch"],
            "k": r["k"],
            "feat_dim": r["feat_dim"],
            "n_data": r["n_data"],
            "kdloss_ms": r["kdloss_ms"],
            "textbook_ms": r["naive_ms"],
            "textbook_cpu_sampling_ms": r["naive_cpu_sampling_ms"],
        }
        for r in doc.get("rows", [])
        if r.get("variant", "default") == "default"
    ]


def _trainer(res: Path) -> list[dict[str, Any]]:
    doc = _load(res / "trainer_step.json") or {}
    rows = []
    for r in doc.get("rows", []):
        rows.append(
            {
                "config": r["impl"],
                "batch": r["batch"],
                "img_per_s": r["images_per_s"],
                "x_plain": r["vs_plain"],
            }
        )
    return rows


def _runs(path: Path) -> list[dict[str, Any]]:
    doc = _load(path / "results.json") or {}
    return list(doc.get("runs", []))


def _tutorial(res: Path) -> list[dict[str, Any]]:
    return [
        {
            "seed": r["seed"],
            "phase": r["method"],
            "accuracy": 100.0 * r["test_last"],
            "train_s": r["train_time_s"],
            "teacher_cache_s": r.get("teacher_cache_s"),
            "img_per_s": r["images_per_s"],
        }
        for r in _runs(res / "tutorial")
    ]


def _imagenette(res: Path) -> list[dict[str, Any]]:
    rows = []
    for name, decode in (("hint_imagenette", "device"), ("hint_imagenette_cpu", "cpu")):
        data = _load(res / f"{name}-data.json")
        if data:
            rows.append(
                {
                    "decode": decode,
                    "method": "data only (no model)",
                    "epochs": 0,
                    "wall_s": data["wall_s"],
                    "img_per_s": data["img_per_s"],
                }
            )
        for r in _runs(res / name):
            if r["method"] == "teacher":
                continue
            rows.append(
                {
                    "decode": decode,
                    "method": r["method"],
                    "epochs": r["epochs"],
                    "wall_s": r["train_time_s"],
                    "img_per_s": r["images_per_s"],
                }
            )
    return rows


def _target(desc: str, value: str, passed: bool | None) -> dict[str, Any]:
    return {"target": desc, "value": value, "passed": passed}


def targets(m: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target the manifest can be read against, with its figure; ``passed`` None when not measured."""
    out = list(m["kernel_targets"])
    tests = m["tests_gpu"] or {}
    checks = [p for p in tests.get("properties", []) if p["name"].startswith("self_check_ms/")]
    for p in checks:  # value: "median X, max Y (...)"
        try:
            median = float(p["value"].split("median", 1)[1].split(",", 1)[0])
        except (IndexError, ValueError):
            out.append(_target(f"kernel self-check {p['name'][14:]} <= 5 ms", p["value"], None))
            continue
        out.append(_target(f"kernel self-check {p['name'][14:]} <= 5 ms", f"{median:.2f} ms", median <= 5.0))
    if not checks:
        out.append(_target("kernel self-check <= 5 ms per key", "-", None))
    crd = {r["batch"]: r for r in m["crd"]}
    for b, limit in CRD_MAX_MS.items():
        r = crd.get(b)
        desc = f"CRD step B={b} <= {limit} ms"
        out.append(
            _target(desc, f"{r['kdloss_ms']:.3f} ms", r["kdloss_ms"] <= limit) if r else _target(desc, "-", None)
        )
    for config, floor in TRAINER_MIN_IMG_S.items():
        rows = [r for r in m["trainer_step"] if r["config"] == config]
        desc = f"trainer step {config} >= {floor:,.0f} img/s"
        if rows:
            best = max(rows, key=lambda r: r["img_per_s"])
            value = f"{best['img_per_s']:,.0f} img/s at batch {best['batch']}"
            out.append(_target(desc, value, best["img_per_s"] >= floor))
        else:
            out.append(_target(desc, "-", None))
    tut = m["tutorial"]
    for seed in TUTORIAL_SEEDS:
        rows = [r for r in tut if r["seed"] == seed and r["phase"] in TUTORIAL_PHASES]
        desc = f"tutorial seed {seed}: phases 1-3 <= {TUTORIAL_MAX_S_PER_SEED:.0f} s"
        if len(rows) == len(TUTORIAL_PHASES):
            total = sum(r["train_s"] + (r["teacher_cache_s"] or 0.0) for r in rows)
            out.append(_target(desc, f"{total:.1f} s", total <= TUTORIAL_MAX_S_PER_SEED))
        else:
            out.append(_target(desc, "-", None))
    for phase, source in TUTORIAL_SOURCE_ACC.items():
        accs = [r["accuracy"] for r in tut if r["phase"] == phase]
        desc = f"tutorial {phase}: 3-seed mean within 1 point of {source}"
        if len(accs) == len(TUTORIAL_SEEDS):
            mean = statistics.mean(accs)
            out.append(_target(desc, f"{mean:.2f} %", abs(mean - source) <= 1.0))
        else:
            out.append(_target(desc, f"{len(accs)} of {len(TUTORIAL_SEEDS)} seeds", None))
    rows = [r for r in m["hint_imagenette"] if r["decode"] == "device" and r["epochs"] > 0]  # (not data-only rows)
    desc = f"hint-imagenette 5 epochs <= {IMAGENETTE_MAX_S:.0f} s"
    if rows:
        r = rows[0]
        ok = r["wall_s"] <= IMAGENETTE_MAX_S if r["epochs"] == 5 else None
        out.append(_target(desc, f"{r['wall_s']:.1f} s for {r['epochs']} epochs", ok))
    else:
        out.append(_target(desc, "-", None))
    return out


def build_manifest(cfg: Config, meta: dict[str, Any], records: list[dict[str, Any]], started: float) -> dict[str, Any]:
    res = cfg.res
    kernels, bandwidth, kernel_targets = _kernels(res)
    m: dict[str, Any] = {
        "schema": SCHEMA,
        "rehearsal": cfg.rehearsal,
        **_env(res, meta),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": meta["command"],
        "budget_s": cfg.budget_s,
        "wall_s": round(time.monotonic() - started, 1),
        "steps": records,
        "tests_gpu": _tests(res),
        "copy_bandwidth_GBps": bandwidth,
        "kernels": kernels,
        "kernel_targets": kernel_targets,
        "crd": _crd(res),
        "trainer_step": _trainer(res),
        "tutorial": _tutorial(res),
        "hint_imagenette": _imagenette(res),
    }
    m["fused_linear"] = fused_linear_targets.rows(res)
    m["targets"] = targets(m) + fused_linear_targets.targets(m["fused_linear"])
    del m["kernel_targets"]
    return m


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_outputs(cfg: Config, meta: dict[str, Any], records: list[dict[str, Any]], started: float) -> dict[str, Any]:
    m = build_manifest(cfg, meta, records, started)
    problems = validate(m)
    if problems:  # a bug in this file, not in what was measured: say so loudly, keep the manifest
        print("[gpu_check] manifest does not match its schema:\n  " + "\n  ".join(problems), file=sys.stderr)
    _atomic_write(cfg.out / "gpu-check.json", (json.dumps(m, indent=1) + "\n").encode())
    _atomic_write(cfg.out / "gpu-check.md", markdown(m).encode())
    tmp = cfg.out / ".gpu-check-logs.tar.gz.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for p in sorted(cfg.res.glob("*")):
            if p.suffix in (".log", ".json", ".xml", ".md") and p.is_file():
                tar.add(p, arcname=p.name)
        for run in sorted(cfg.res.glob("*/results.*")):
            if run.suffix in (".json", ".md"):
                tar.add(run, arcname=f"{run.parent.name}/{run.name}")
    os.replace(tmp, cfg.out / "gpu-check-logs.tar.gz")
    return m


# ---------------------------------------------------------------------------------- the schema

_STR, _NUM, _INT, _BOOL = (str,), (int, float), (int,), (bool,)
_OPT_STR = (str, type(None))
_OPT_NUM = (int, float, type(None))
_OPT_INT = (int, type(None))
_OPT_BOOL = (bool, type(None))

SCHEMA_FIELDS: dict[str, tuple[type, ...]] = {
    "schema": _STR,
    "rehearsal": _BOOL,
    "device": _STR,
    "driver": _OPT_STR,
    "torch": _OPT_STR,
    "triton": _OPT_STR,
    "torchvision": _OPT_STR,
    "python": _OPT_STR,
    "cuda": _OPT_STR,
    "commit": _STR,
    "date": _STR,
    "command": _STR,
    "budget_s": _NUM,
    "wall_s": _NUM,
    "steps": (list,),
    "tests_gpu": (dict, type(None)),
    "copy_bandwidth_GBps": _OPT_NUM,
    "kernels": (list,),
    "crd": (list,),
    "trainer_step": (list,),
    "tutorial": (list,),
    "hint_imagenette": (list,),
    "fused_linear": (list,),
    "targets": (list,),
}
ROW_FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    "steps": {"name": _STR, "status": _STR, "rc": _OPT_INT, "wall_s": _OPT_NUM, "limit_s": _NUM, "note": _STR},
    "kernels": {
        "case": _STR,
        "shape": _STR,
        "dtype": _STR,
        "mode": _STR,
        "impl": _STR,
        "median_s": _NUM,
        "pct_of_floor": _NUM,
        "x_naive": _OPT_NUM,
        "x_compiled": _OPT_NUM,
        "peak_extra_bytes": _OPT_INT,
    },
    "crd": {"batch": _INT, "kdloss_ms": _NUM, "textbook_ms": _NUM},
    "trainer_step": {"config": _STR, "batch": _INT, "img_per_s": _NUM},
    "tutorial": {"seed": _INT, "phase": _STR, "accuracy": _NUM, "train_s": _NUM},
    "hint_imagenette": {"decode": _STR, "epochs": _INT, "wall_s": _NUM, "img_per_s": _NUM},
    "fused_linear": {
        "device": _STR,
        "case": _STR,
        "impl": _STR,
        "median_s": _OPT_NUM,
        "peak_bytes": _OPT_INT,
        "note": _STR,
    },
    "targets": {"target": _STR, "value": _STR, "passed": _OPT_BOOL},
}
STEP_NAMES = (
    "env",
    "tests_gpu",
    "kernels",
    "crd",
    "trainer_step",
    "tutorial",
    "hint_imagenette",
    "hint_imagenette_cpu",
    "fused_linear",
)
STEP_STATUSES = ("pending", "running", "ok", "failed", "timeout", "not run")


def _type_ok(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool) and bool not in types:
        return False  # a bool is an int to isinstance; not to this schema
    return isinstance(value, types)


def validate(m: Any) -> list[str]:
    """What is wrong with a manifest (empty when it matches the schema)."""
    if not isinstance(m, dict):
        return [f"the manifest must be a JSON object, got {type(m).__name__}"]
    problems = []
    for key, types in SCHEMA_FIELDS.items():
        if key not in m:
            problems.append(f"missing field {key!r}")
        elif not _type_ok(m[key], types):
            want = " or ".join(t.__name__ for t in types)
            problems.append(f"field {key!r} must be {want}, got {type(m[key]).__name__}")
    if m.get("schema") != SCHEMA:
        problems.append(f"field 'schema' must be {SCHEMA!r}, got {m.get('schema')!r}")
    for section, fields_ in ROW_FIELDS.items():
        rows = m.get(section)
        if not isinstance(rows, list):
            continue
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                problems.append(f"{section}[{i}] must be an object")
                continue
            for key, types in fields_.items():
                if key not in row:
                    problems.append(f"{section}[{i}] is missing {key!r}")
                elif not _type_ok(row[key], types):
                    problems.append(f"{section}[{i}].{key} has type {type(row[key]).__name__}")
    steps = m.get("steps")
    if isinstance(steps, list):
        names = [s.get("name") for s in steps if isinstance(s, dict)]
        if not set(names) >= {"env"} or any(n not in STEP_NAMES for n in names):
            problems.append(f"steps must name steps of {STEP_NAMES} (env included), got {names}")
        for s in steps:
            if isinstance(s, dict) and s.get("status") not in STEP_STATUSES:
                problems.append(
                    f"step {s.get('name')!r} has status {s.get('status')!r}, expected one of {STEP_STATUSES}"
                )
    tests = m.get("tests_gpu")
    if isinstance(tests, dict):
        for key in ("passed", "failed", "skipped"):
            if not _type_ok(tests.get(key), _INT):
                problems.append(f"tests_gpu.{key} must be an int")
        if not isinstance(tests.get("failures"), list):
            problems.append("tests_gpu.failures must be a list")
    return problems


# ---------------------------------------------------------------------------------- the tables


def _t(s: float) -> str:
    return f"{s * 1e6:.1f} us" if s < 1e-3 else f"{s * 1e3:.3f} ms"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def markdown(m: dict[str, Any]) -> str:
    lines = ["# kdloss GPU check", ""]
    if m["rehearsal"]:
        lines += [
            "**CPU rehearsal at tiny sizes: these figures measure nothing about a GPU.** They prove that",
            "every step of the check runs and that its manifest is complete.",
            "",
        ]
    lines += [
        f"- device: {m['device']}; driver {m['driver']}; CUDA {m['cuda']}",
        f"- torch {m['torch']}, triton {m['triton']}, torchvision {m['torchvision']}, python {m['python']}",
        f"- commit {m['commit']}; {m['date']}; wall time {m['wall_s']:.0f} s of a {m['budget_s']:.0f} s budget",
        f"- command: `{m['command']}`",
        "",
        "## Steps",
        "",
        "| step | status | rc | wall s | limit s | note |",
        "|---|---|---:|---:|---:|---|",
    ]
    for s in m["steps"]:
        note = s["note"].replace("\n", " / ").replace("|", "\\|")[:200]
        wall = "-" if s["wall_s"] is None else f"{s['wall_s']:.1f}"
        rc = "-" if s["rc"] is None else str(s["rc"])
        lines.append(f"| {s['name']} | {s['status']} | {rc} | {wall} | {s['limit_s']:.0f} | {note} |")
    lines += ["", "## Targets", "", "| target | figure | result |", "|---|---|---|"]
    for t in m["targets"]:
        res = "not measured" if t["passed"] is None else ("met" if t["passed"] else "MISSED")
        lines.append(f"| {t['target']} | {t['value']} | {res} |")
    tests = m["tests_gpu"]
    lines += ["", "## CUDA-only tests (`pytest -m gpu`)", ""]
    if tests is None:
        lines.append("not run")
    else:
        lines.append(f"{tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} skipped")
        lines += [f"- failed: `{name}`" for name in tests["failures"]]
        lines += [f"- `{p['name']}`: {p['value']}" for p in tests.get("properties", [])]
    lines += ["", "## Soft-KL kernels (kd, kd_ce)", ""]
    if m["copy_bandwidth_GBps"] is not None:
        lines += [
            f"Measured copy bandwidth {m['copy_bandwidth_GBps']:.0f} GB/s (read + write); floor = bytes / it.",
            "",
        ]
    lines += [
        "| case | shape | mode | impl | median | % of floor | x naive | x compiled | peak extra |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in m["kernels"]:
        extra = "-" if r["peak_extra_bytes"] is None else f"{r['peak_extra_bytes'] / 2**20:.1f} MiB"
        lines.append(
            f"| {r['case']} | {r['shape']} | {r['mode']} | {r['impl']} | {_t(r['median_s'])} | "
            f"{r['pct_of_floor']:.1f} | {_x(r['x_naive'])} | {_x(r['x_compiled'])} | {extra} |"
        )
    lines += ["", "## CRD step (forward, backward, bank update)", ""]
    lines += [
        "| B | K | d | n | kdloss ms | textbook ms | textbook + CPU sampling ms |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in m["crd"]:
        lines.append(
            f"| {r['batch']} | {r['k']} | {r['feat_dim']} | {r['n_data']} | {r['kdloss_ms']:.3f} | "
            f"{r['textbook_ms']:.3f} | {r['textbook_cpu_sampling_ms']:.3f} |"
        )
    lines += ["", "## Trainer student step", ""]
    lines += ["| config | batch | images/s | x plain fp32 b64 |", "|---|---:|---:|---:|"]
    for r in m["trainer_step"]:
        lines.append(f"| {r['config']} | {r['batch']} | {r['img_per_s']:,.0f} | {r['x_plain']:.2f}x |")
    lines += ["", "## tutorial-cifar10, phases 1-3 (all 50,000 training images, last-epoch test accuracy)", ""]
    lines += ["| seed | phase | test acc % | train s | teacher cache s | images/s |", "|---:|---|---:|---:|---:|---:|"]
    for r in m["tutorial"]:
        cache = "-" if r["teacher_cache_s"] is None else f"{r['teacher_cache_s']:.1f}"
        lines.append(
            f"| {r['seed']} | {r['phase']} | {r['accuracy']:.2f} | {r['train_s']:.1f} | {cache} | "
            f"{r['img_per_s']:,.0f} |"
        )
    lines += ["", "## hint-imagenette (synthetic tree of Imagenette's shape, random weights: timing only)", ""]
    lines += ["| decode | run | epochs | train s | images/s |", "|---|---|---:|---:|---:|"]
    for r in m["hint_imagenette"]:
        lines.append(f"| {r['decode']} | {r['method']} | {r['epochs']} | {r['wall_s']:.1f} | {r['img_per_s']:,.0f} |")
    lines += ["", *fused_linear_targets.markdown(m["fused_linear"])]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ helper commands


def cmd_env(path: str) -> int:
    import platform

    import torch
    import torchvision

    try:
        import triton

        triton_version: str | None = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.cuda.is_available()
    driver = None
    if shutil.which("nvidia-smi"):
        q = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
        )
        driver = q.stdout.strip().splitlines()[0] if q.returncode == 0 and q.stdout.strip() else None
    env = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "driver": driver,
        "torch": torch.__version__,
        "triton": triton_version,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda if cuda else None,
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(env, indent=1))
    if shutil.which("nvidia-smi"):
        subprocess.run(["nvidia-smi"], check=False)
    _atomic_write(Path(path), json.dumps(env, indent=1).encode())
    return 0


def cmd_extract(archive: str, dest: str) -> int:
    """Extract a CIFAR-10 JPEG archive (or link an extracted folder) to ``dest``; reused when done."""
    src, out = Path(archive), Path(dest)
    if (out / "train").is_dir() and (out / ".complete").is_file():
        return 0
    if src.is_dir():
        if not (src / "train").is_dir():
            raise SystemExit(f"--cifar10: folder {str(src)!r} has no train/ (expected the archive's layout)")
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists() or out.is_symlink():
            shutil.rmtree(out) if out.is_dir() and not out.is_symlink() else out.unlink()
        out.symlink_to(src.resolve(), target_is_directory=True)
        return 0
    if not src.is_file():
        raise SystemExit(f"--cifar10: {str(src)!r} does not exist")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    subprocess.run(["tar", "-xzf", str(src), "-C", str(tmp)], check=True)
    (tmp / ".complete").write_text("ok\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    print(f"extracted {src} to {out} in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_tiny_cifar10(path: str, per_class: int = 12, test_per_class: int = 4) -> int:
    """A CIFAR-10-shaped JPEG archive (``train/<class>``, ``test/<class>``, 32x32) of random images."""
    import io

    import torch
    from torchvision.io import encode_jpeg

    classes = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    gen = torch.Generator().manual_seed(0)
    out = Path(path)
    tmp = out.with_name(out.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for split, n in (("train", per_class), ("test", test_per_class)):
            for c, name in enumerate(classes):
                for i in range(n):
                    img = (torch.rand(3, 32, 32, generator=gen) * 128 + 12 * c).clamp(0, 255).byte()
                    data = encode_jpeg(img, quality=75).numpy().tobytes()
                    info = tarfile.TarInfo(f"{split}/{name}/{i:04d}.jpg")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, out)
    return 0


def cmd_data_rate(
    root: str, decode: str, device: str, workers: int, batch: int, size: int, seconds: float, out: str
) -> int:
    """Images/s of hint-imagenette's training source alone (no model): where a slow run's time goes.

    The recipe's train transform and ``FolderBatches`` settings; the first two batches (worker
    start-up, nvJPEG initialisation) are not timed; stops after ``seconds`` or the epoch's end.
    """
    import torch

    from reference_trainers.data import FolderBatches
    from reference_trainers.recipes.hint_imagenette import transforms

    dev = torch.device(device)
    source = FolderBatches(
        Path(root) / "train",
        batch,
        dev,
        shuffle=True,
        transform=transforms(size)[0],
        deterministic=False,
        num_workers=workers,
        decode=decode,  # type: ignore[arg-type]
    )
    images = n_batches = 0
    t0 = time.perf_counter()
    for k, b in enumerate(source.batches(0)):
        if k == 2:  # past the start-up
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
        elif k > 2:
            images += b.labels.numel()
            n_batches += 1
            if time.perf_counter() - t0 > seconds:
                break
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    wall = time.perf_counter() - t0
    row = {
        "decode": source.decode,
        "device": str(dev),
        "workers": workers,
        "batch_size": batch,
        "image_size": size,
        "batches": n_batches,
        "images": images,
        "wall_s": wall,
        "img_per_s": images / wall if images and wall > 0 else 0.0,
    }
    tmp = Path(out).with_name(Path(out).name + ".tmp")
    tmp.write_text(json.dumps(row, indent=1) + "\n")
    os.replace(tmp, out)
    print(f"data only ({source.decode} decode, {workers} workers): {row['img_per_s']:,.0f} img/s over {images} images")
    return 0


def cmd_synthetic_tree(root: str, n_train: int, n_val: int, short_side: int) -> int:
    from reference_trainers.recipes.hint_imagenette import make_synthetic_imagefolder

    t0 = time.perf_counter()
    workers = max(1, min(16, (os.cpu_count() or 1)))
    make_synthetic_imagefolder(Path(root), n_train=n_train, n_val=n_val, short_side=short_side, workers=workers)
    print(f"synthetic tree {root}: {n_train} + {n_val} JPEGs in {time.perf_counter() - t0:.1f} s ({workers} workers)")
    return 0


def _git_commit() -> str:
    env_commit = os.environ.get("GPU_CHECK_COMMIT")
    if env_commit:
        return env_commit
    try:
        q = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
        return q.stdout.strip() + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git; set GPU_CHECK_COMMIT)"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    helpers: dict[str, Callable[..., int]] = {
        "env": lambda p: cmd_env(p),
        "extract": lambda a, d: cmd_extract(a, d),
        "tiny-cifar10": lambda p: cmd_tiny_cifar10(p),
        "synthetic-tree": lambda r, a, b, c: cmd_synthetic_tree(r, int(a), int(b), int(c)),
        "data-rate": lambda r, d, dev, w, b, sz, sec, o: cmd_data_rate(
            r, d, dev, int(w), int(b), int(sz), float(sec), o
        ),
    }
    if args and args[0] in helpers:
        return helpers[args[0]](*args[1:])
    if args and args[0] == "validate":
        if len(args) != 2:
            print("usage: python -m benchmarks.gpu_check validate gpu-check.json", file=sys.stderr)
            return 2
        problems = validate(_load(Path(args[1])))
        print("\n".join(problems) or f"{args[1]}: matches {SCHEMA}")
        return 1 if problems else 0
    p = argparse.ArgumentParser(
        prog="bash scripts/gpu_check.sh", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--cifar10", type=Path, default=os.environ.get("KDLOSS_CIFAR10") or None)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "runs" / "gpu-check"))
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a fresh temporary one)")
    p.add_argument("--budget", type=float, default=float(os.environ.get("GPU_CHECK_BUDGET", DEFAULT_BUDGET_S)))
    p.add_argument("--rehearsal", action="store_true", default=os.environ.get("GPU_CHECK_REHEARSAL") == "1")
    p.add_argument("--only", default="", help=f"comma-separated subset of {','.join(STEP_NAMES)} (env always runs)")
    a = p.parse_args(args)
    only = [s for s in a.only.split(",") if s]
    bad = [s for s in only if s not in STEP_NAMES]
    if bad:
        p.error(f"--only: unknown step(s) {bad}; choose from {', '.join(STEP_NAMES)}")
    if a.budget <= 0:
        p.error(f"--budget must be > 0 seconds, got {a.budget}")
    if a.cifar10 is not None and not a.cifar10.exists():
        p.error(f"--cifar10 (or KDLOSS_CIFAR10): {str(a.cifar10)!r} does not exist")
    if not a.rehearsal:
        import torch

        if not torch.cuda.is_available():
            p.error("no CUDA device: this check needs one GPU (GPU_CHECK_REHEARSAL=1 runs its CPU rehearsal)")
        if a.cifar10 is None:
            print("[gpu_check] no CIFAR-10 archive given (--cifar10 or KDLOSS_CIFAR10): the tutorial step will not run")
    import tempfile

    work = a.work or Path(tempfile.mkdtemp(prefix="kdloss-gpu-check-"))
    cfg = Config(a.rehearsal, a.out, work, a.budget, a.cifar10, _git_commit(), only, list(args))
    return run_check(cfg)


if __name__ == "__main__":
    raise SystemExit(main())
