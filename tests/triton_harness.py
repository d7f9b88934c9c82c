"""Shared harness of the Triton kernel tests (``test_kernels.py``, ``test_cohort_kernel.py``,
``test_attention_kernel.py``, ``test_kernel_verify.py``).

On CPU a kernel runs under Triton's interpreter, which must be switched on before Triton is first
imported. An ordinary test run therefore collects one test of a kernel file that matters on CPU,
``test_interpreter_subprocess`` (:func:`interpreter_subprocess_test`), which re-runs the whole
file in a fresh interpreter with ``TRITON_INTERPRET=1`` (:func:`run_file_under_interpreter`), so
nothing leaks into the other tests' process; the kernel cases (:data:`needs_kernel`) run there.
Run one file's cases directly with::

    TRITON_INTERPRET=1 PYTHONPATH=. python -m pytest -q tests/test_kernels.py

On a CUDA machine (without the variable) the same cases run on the GPU.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE: str | None = "cpu" if INTERPRET else ("cuda" if torch.cuda.is_available() and HAS_TRITON else None)


def _let_old_interpreters_loop() -> None:
    """Test-side fix of a Triton interpreter bug, so the kernels are checked on CPU with older Triton too.

    A loop over a runtime bound (``for s in range(0, n, BLOCK)``, as every kernel here has) makes
    the interpreter take ``int()`` of ``n``, which it holds as a one-element array; some Triton
    releases (3.6, the GPU machine's) call ``int(array)``, which NumPy >= 2.4 refuses ("only
    0-dimensional arrays can be converted to Python scalars"). Triton 3.9 squeezes the array
    first; this does the same where it is missing. Only the interpreter is touched.
    """
    import inspect

    from triton.runtime import interpreter

    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or "squeeze" in inspect.getsource(patch):
        return

    def patched(tensor: type, scope: object) -> None:
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))  # type: ignore[attr-defined]

    interpreter._patch_lang_tensor = patched


if INTERPRET and HAS_TRITON:
    _let_old_interpreters_loop()

needs_kernel = pytest.mark.skipif(
    DEVICE is None or not HAS_TRITON,
    reason="kernel cases run in the TRITON_INTERPRET=1 subprocess (test_interpreter_subprocess) or on CUDA",
)
outer_run_only = pytest.mark.skipif(INTERPRET, reason="runs once, in the outer (non-interpreter) test run")


def run_file_under_interpreter(path: str | Path, min_passed: int) -> None:
    """Run the test file ``path`` with ``TRITON_INTERPRET=1``; it must pass at least ``min_passed`` tests."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", str(path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    passed = re.search(r"(\d+) passed", out)
    assert passed is not None, out[-2000:]
    assert int(passed.group(1)) >= min_passed, out[-2000:]
    assert "failed" not in out, out[-2000:]


def interpreter_subprocess_test(path: str | Path, min_passed: int) -> Callable[[], None]:
    """A kernel file's ``test_interpreter_subprocess``: the file under the interpreter must pass at
    least ``min_passed`` tests (skipped inside that run, and without Triton). Use it as::

        test_interpreter_subprocess = interpreter_subprocess_test(__file__, N_CASES)
    """

    @pytest.mark.skipif(INTERPRET, reason="already inside the interpreter run")
    @pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
    def test_interpreter_subprocess() -> None:
        run_file_under_interpreter(path, min_passed)

    return test_interpreter_subprocess


def eager_without_triton(launcher: str, code: str) -> list[str]:
    """The words ``code`` prints in a fresh interpreter where ``import triton`` fails, run after
    checking that kdloss imports, reports no kernels and that ``kdloss.kernels.<launcher>`` (the
    op's Triton module) has no ``triton``. ``torch`` and ``kdloss.kernels as K`` are imported."""
    prelude = (
        "import torch, kdloss.kernels as K\n"
        f"import kdloss.kernels.{launcher} as launcher\n"
        "assert not K.kernels_available() and launcher.triton is None\n"
    )
    return run_without_triton(prelude + code).split()


def run_without_triton(code: str) -> str:
    """Run ``code`` in a fresh interpreter where ``import triton`` fails; return its stdout."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['triton'] = None\n" + code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def assert_no_local_memory(compiled: object, tmp_path: Path) -> None:
    """An ahead-of-time compiled kernel keeps nothing in local memory: no arrays, no register spills."""
    asm = compiled.asm  # type: ignore[attr-defined]
    assert ".local" not in asm["ptx"]  # no local-memory arrays in the PTX
    import triton

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if cuobjdump.exists():  # ptxas' register allocation: no spills to local memory
        cubin = tmp_path / "kernel.cubin"
        cubin.write_bytes(asm["cubin"])
        usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(cubin)], capture_output=True, text=True)
        local = re.search(r"LOCAL:(\d+)", usage.stdout)
        assert local is not None, usage.stdout + usage.stderr
        assert int(local.group(1)) == 0, usage.stdout
