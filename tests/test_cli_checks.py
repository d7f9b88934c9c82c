"""Bad options are refused before any work: one line on stderr, exit code 2, nothing trained or written.

The cases run through the real entry point, ``reference_trainers.__main__.main``, in one child
process (one torch import for all of them; CUDA hidden, so ``--device cuda`` has none), which
reports every case's exit code, stderr and stdout as JSON. One more case runs
``python -m reference_trainers`` itself. A case that needs a module to be missing hides it
(``sys.modules[name] = None``); a case that needs a full disk lowers ``RLIMIT_FSIZE`` so that
writing a file past that size fails (``EFBIG``), as a full disk fails with ``ENOSPC``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torchvision.io import encode_jpeg

ROOT = Path(__file__).resolve().parents[1]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0

DRIVER = r"""
import contextlib, io, json, resource, signal, sys
from pathlib import Path
from reference_trainers.__main__ import main

results = {}
for case in json.loads(sys.argv[1]):
    hidden = {name: sys.modules.get(name) for name in case.get("hide", [])}
    for name in hidden:
        sys.modules[name] = None  # importlib.util.find_spec and import now fail for it
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    if case.get("fsize") is not None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (case["fsize"], limits[1]))
    err, out = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            rc = main(case["argv"])
    except SystemExit as e:
        rc = e.code
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        for name, module in hidden.items():
            if module is None:
                del sys.modules[name]
            else:
                sys.modules[name] = module
    results[case["id"]] = {"rc": rc, "err": err.getvalue(), "out": out.getvalue()}
print(json.dumps(results))
"""


def _jpeg(seed: int, size: int = 32) -> bytes:
    img = torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    return bytes(encode_jpeg(img).numpy().tobytes())


def _tree(root: Path, splits: tuple[str, ...]) -> Path:
    for split in splits:
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(3):
                (root / split / c / f"{i}.jpg").write_bytes(_jpeg(i))
    return root


def _files(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()) if path.exists() else []


# (id, argv, expected fragment of the one-line message); "{tmp}" is the test's temporary folder
# and every case writes (or would write) to "{tmp}/<id>".
REFUSED: list[tuple[str, list[str], str]] = [
    ("val-size-negative", ["demo", "--val-size", "-1"], "argument --val-size: expected an integer >= 0, got '-1'"),
    ("val-size-too-big", ["demo", "--val-size", "10000"], "--val-size 10000 must be smaller than the 10,000"),
    ("val-size-folder", ["demo", "--data-root", "{tmp}/tree", "--val-size", "6"], "smaller than the 6 training"),
    ("lr-negative", ["demo", "--lr", "-1"], "argument --lr: expected a number > 0, got '-1'"),
    ("lr-nan", ["tutorial-cifar10", "--lr", "nan"], "argument --lr: expected a finite number, got 'nan'"),
    ("temperature", ["demo", "--temperature", "-1"], "argument --temperature: expected a number > 0"),
    ("kd-weight", ["demo", "--kd-weight", "1.5"], "argument --kd-weight: expected a number in [0, 1], got '1.5'"),
    ("teacher-epochs", ["demo", "--teacher-epochs", "0"], "argument --teacher-epochs: expected a positive integer"),
    ("workers", ["demo", "--workers", "-2"], "argument --workers: expected an integer >= 0, got '-2'"),
    ("device-tpu", ["demo", "--device", "tpu"], "argument --device: expected auto, cpu, cuda or cuda:N, got 'tpu'"),
    ("device-cuda", ["demo", "--device", "cuda"], "--device cuda asks for CUDA, but torch.cuda.is_available()"),
    ("resume-overwrite", ["demo", "--resume", "--overwrite"], "argument --overwrite: not allowed with argument"),
    ("methods", ["demo", "--methods", "kd,magic"], "unknown method(s) ['magic'] in --methods"),
    ("out-is-file", ["demo", "--out", "{tmp}/a-file"], "must be a directory, but it is in the way of a file"),
    ("out-under-file", ["demo", "--out", "{tmp}/a-file/run"], "is a file"),
    ("out-disk-full", ["demo"], "is not writable: File too large"),
    ("checkpoints-exist", ["demo", "--out", "{tmp}/earlier"], "already holds checkpoints of an earlier run"),
    ("demo-data-root", ["demo", "--data-root", "{tmp}/missing"], "--data-root '{tmp}/missing' does not exist"),
    ("embedded-and-root", ["demo", "--dataset", "embedded", "--data-root", "{tmp}"], "takes no --data-root"),
    ("download-embedded", ["demo", "--download"], "--download fetches torchvision's CIFAR-10/100 only"),
    ("tutorial-no-data", ["tutorial-cifar10"], "pass --data-root DIR (torchvision's CIFAR-10 files"),
    ("blog-no-data", ["blog-cifar10"], "or --dataset embedded to run on the package's 10,000-image subset"),
    ("blog-model", ["blog-cifar10", "--dataset", "embedded", "--student", "nope"], "--student 'nope' is not a"),
    ("blog-alpha", ["blog-cifar10", "--dataset", "embedded", "--alpha", "0.1"], "pass --kd-weight 0.9 for the same"),
    ("dih-no-data", ["dih"], "--dataset cifar100 needs --data-root DIR"),
    ("dih-takd", ["dih", "--smoke", "--method", "kd,takd"], "method 'takd' needs a teacher assistant: pass --ta"),
    ("bench-method", ["benchmark-cifar100", "--smoke", "--method", "nope"], "unknown method 'nope'; available: ce"),
    ("bench-ckpt", ["benchmark-cifar100", "--teacher-checkpoint", "{tmp}/none.pth"], "'{tmp}/none.pth' does not"),
    ("crd-momentum", ["benchmark-cifar100", "--crd-nce-m", "2"], "argument --crd-nce-m: expected a number in [0, 1]"),
    ("hint-no-data", ["hint-imagenette", "--random-init"], "needs --data-root (an Imagenette tree"),
    ("hint-layout", ["hint-imagenette", "--random-init", "--data-root", "{tmp}/tree"], "must contain val/"),
    ("hint-dataset", ["hint-imagenette", "--synthetic", "--dataset", "cifar10"], "reads an ImageFolder tree"),
    ("hint-subset", ["hint-imagenette", "--synthetic", "--train-subset", "5"], "does not use --train-subset"),
    ("hint-both", ["hint-imagenette", "--synthetic", "--data-root", "{tmp}/nette"], "not both"),
    ("hint-faithful", ["hint-imagenette", "--synthetic", "--faithful", "--val-size", "3"], "takes no --val-size"),
    ("hint-weights", ["hint-imagenette", "--synthetic", "--imagenet-weights", "{tmp}/w"], "'{tmp}/w' does not exist"),
    ("hint-no-weights", ["hint-imagenette", "--synthetic"], "no ImageNet weights for tv_resnet50"),
    ("hint-corrupt", ["hint-imagenette", "--data-root", "{tmp}/nette", "--random-init"], "not readable images"),
    ("no-tqdm", ["demo"], "missing: tqdm): pip install '.[trainers]'"),
    ("no-matplotlib", ["demo", "--no-progress"], "missing: matplotlib): pip install '.[trainers]'"),
]
HIDE = {"no-tqdm": ["tqdm"], "no-matplotlib": ["matplotlib"]}
FSIZE = {"out-disk-full": 1000}
if not IS_ROOT:  # root writes into read-only directories: the case cannot be built there
    REFUSED.append(("out-read-only", ["demo", "--out", "{tmp}/read-only/run"], "is not writable: Permission denied"))


@pytest.fixture(scope="module")
def refused(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """Run every REFUSED case (and one that fails mid-run for lack of room) in one child process."""
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "a-file").write_text("not a directory")
    _tree(tmp / "tree", ("train", "test"))  # 6 training images
    nette = _tree(tmp / "nette", ("train", "val"))
    (nette / "train" / "b" / "bad.jpg").write_bytes(b"<html>404 Not Found</html>")
    (tmp / "earlier" / "checkpoints").mkdir(parents=True)
    (tmp / "earlier" / "checkpoints" / "teacher-seed42.pt").write_bytes(b"an earlier run's checkpoint")
    (tmp / "read-only").mkdir()
    (tmp / "read-only").chmod(0o555)
    cases = []
    for case_id, argv, _ in REFUSED:
        argv = [a.replace("{tmp}", str(tmp)) for a in argv]
        if "--out" not in argv:
            argv += ["--out", str(tmp / case_id)]
        cases.append({"id": case_id, "argv": argv, "hide": HIDE.get(case_id, []), "fsize": FSIZE.get(case_id)})
    # Room for the 1 MiB write test and the teacher's checkpoint, not for the students': the run
    # starts, then fails to write; --overwrite first deletes the earlier run's checkpoint.
    (tmp / "full" / "checkpoints").mkdir(parents=True)
    (tmp / "full" / "checkpoints" / "kd-seed42.pt").write_bytes(b"an earlier run's checkpoint")
    full = ["demo", "--smoke", "--overwrite", "--threads", "1", "--out", str(tmp / "full")]
    cases.append({"id": "full-mid-run", "argv": full, "hide": [], "fsize": 2 << 20})
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    env["TORCH_HOME"] = str(tmp / "torch-home")  # no cached ImageNet weights
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(cases)],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.parametrize(("case_id", "argv", "message"), REFUSED, ids=[c[0] for c in REFUSED])
def test_refused_up_front(refused: tuple[Path, dict[str, Any]], case_id: str, argv: list[str], message: str) -> None:
    tmp, results = refused
    result = results[case_id]
    lines = result["err"].splitlines()
    assert result["rc"] == 2, result
    assert len(lines) == 1, f"expected one line on stderr, got: {result['err']}"  # no data read, no epoch run
    assert message.replace("{tmp}", str(tmp)) in lines[0]
    assert lines[0].startswith(("error: ", "python -m reference_trainers")), lines[0]
    assert result["out"] == ""
    out = tmp / case_id
    if case_id == "checkpoints-exist":
        assert _files(tmp / "earlier") == ["checkpoints/teacher-seed42.pt"]  # left as it was
        assert (tmp / "earlier" / "checkpoints" / "teacher-seed42.pt").read_bytes() == b"an earlier run's checkpoint"
    else:
        assert not out.exists() or _files(out) == [], _files(out)  # nothing written, not even a folder


def test_a_full_disk_mid_run_is_one_line_and_exit_2(refused: tuple[Path, dict[str, Any]]) -> None:
    tmp, results = refused
    result = results["full-mid-run"]
    lines = result["err"].splitlines()
    assert result["rc"] == 2, result
    assert "--overwrite: deleted 1 checkpoints of an earlier run" in result["err"]
    assert lines[-1].startswith(f"error: cannot write '{tmp / 'full'}/"), lines[-1]
    assert "File too large" in lines[-1]
    assert lines[-1].endswith("then continue with --resume"), lines[-1]
    assert "Traceback" not in result["err"]
    files = _files(tmp / "full")
    assert "checkpoints/kd-seed42.pt" not in files  # the earlier run's file was deleted, not read
    assert not [f for f in files if f.startswith("results") or f.endswith(".tmp")], files


def test_python_m_reference_trainers_refuses_a_bad_value(tmp_path: Path) -> None:
    """The installed entry point itself: exit code 2 and one line, before torch builds anything."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "reference_trainers", "demo", "--lr", "-1", "--out", str(tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "python -m reference_trainers demo: error: argument --lr: expected a number > 0, got '-1' "
        "(see python -m reference_trainers demo --help)"
    ]
    assert not (tmp_path / "out").exists()
