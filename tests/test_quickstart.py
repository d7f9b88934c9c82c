"""Run the code block of docs/quickstart.md exactly as written, so the quickstart cannot rot."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from kdloss import check_optimizer

pytest.importorskip("torchvision")

QUICKSTART = Path(__file__).resolve().parents[1] / "docs" / "quickstart.md"


def _snippet() -> str:
    text = QUICKSTART.read_text(encoding="utf-8")
    found = re.search(r"<!-- quickstart:start -->\s*```python\n(.*?)```\s*<!-- quickstart:end -->", text, re.S)
    if found is None:
        raise AssertionError(f"no ```python block between the quickstart markers in {QUICKSTART}")
    return found.group(1)


def test_quickstart_is_short() -> None:
    lines = [line for line in _snippet().splitlines() if line.strip()]
    assert len(lines) < 15, f"the quickstart grew to {len(lines)} lines"


def test_quickstart_runs_and_trains() -> None:
    torch.manual_seed(0)
    namespace: dict[str, object] = {}
    exec(compile(_snippet(), str(QUICKSTART), "exec"), namespace)

    teacher, student, adapter = namespace["teacher"], namespace["student"], namespace["adapter"]
    assert isinstance(teacher, torch.nn.Module)
    assert isinstance(student, torch.nn.Module)
    assert isinstance(adapter, torch.nn.Module)
    parts = namespace["parts"]
    assert isinstance(parts, dict)
    assert set(parts) == {"ce", "kd", "hint", "total"}
    assert all(torch.isfinite(v) and not v.requires_grad for v in parts.values())
    expected = 0.1 * parts["ce"] + 0.9 * parts["kd"] + 0.5 * parts["hint"]
    torch.testing.assert_close(parts["total"], expected)
    # The step trained the student and the adapter, and left the teacher alone.
    assert all(p.grad is not None for p in adapter.parameters())
    optimizer = namespace["optimizer"]
    assert isinstance(optimizer, torch.optim.Optimizer)
    check_optimizer(optimizer, adapter)
    assert student.layer3[0].conv1.weight.grad is not None
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not teacher.training
    # No hook survives the step.
    for model in (teacher, student):
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_readme_shows_the_same_snippet() -> None:
    readme = QUICKSTART.parents[1] / "README.md"
    assert _snippet() in readme.read_text(encoding="utf-8"), "README.md's quickstart differs from docs/quickstart.md"
