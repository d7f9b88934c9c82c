"""The floors of docs/architecture.md hold: imports flow one way, no module reads another's private
names, and the trainers' method table is written in one place (nothing registers itself on import).

Read from the source (``ast``), so a violation names the file and the line.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kdloss", "reference_trainers")

# module prefix -> floor; a module may import from its own floor and the ones below, never above.
FLOORS: dict[str, int] = {
    "kdloss._validate": 0,
    "kdloss._numerics": 0,
    "kdloss.compose": 1,
    "kdloss.kernels": 1,
    "kdloss.tap": 1,
    "kdloss.teacher": 1,
    "kdloss.functional": 2,
    "kdloss.parts": 3,
    "kdloss.losses": 4,
    "kdloss": 5,  # the package face and the deprecated re-exports (kdloss.memory, kdloss.adapters, ...)
    "reference_trainers.errors": 10,
    "reference_trainers.data": 11,
    "reference_trainers.models": 11,
    "reference_trainers.engine": 12,
    "reference_trainers.methods": 13,
    "reference_trainers.recipes": 14,
    "reference_trainers.__main__": 15,
    "reference_trainers": 15,
}


def _floor(module: str) -> int:
    best = max((p for p in FLOORS if module == p or module.startswith(p + ".")), key=len)
    return FLOORS[best]


def _modules() -> Iterator[tuple[str, Path]]:
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            yield name, path


def _is_package(module: str) -> bool:
    return (ROOT / Path(*module.split(".")) / "__init__.py").is_file()


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not _is_package(module):
        base = base[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join([*base, node.module] if node.module else base)


def _is_submodule(module: str, name: str) -> bool:
    path = ROOT / Path(*module.split("."))
    return (path / f"{name}.py").is_file() or (path / name / "__init__.py").is_file()


def _imports(module: str, path: Path) -> Iterator[tuple[int, str, list[str]]]:
    """``(line, imported module, names)`` for every import of our packages in ``path``."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            if target.split(".")[0] in PACKAGES:
                yield node.lineno, target, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES:
                    yield node.lineno, alias.name, []


MODULES = list(_modules())


def test_the_scan_sees_every_module() -> None:
    names = {m for m, _ in MODULES}
    assert {"kdloss._numerics", "kdloss.parts.contrastive", "reference_trainers.methods.steps"} <= names
    assert len(names) > 60


def test_imports_flow_down_the_floors() -> None:
    upward = []
    for module, path in MODULES:
        for line, target, names in _imports(module, path):
            targets = [f"{target}.{n}" if _is_submodule(target, n) else target for n in names] or [target]
            for t in targets:
                if _floor(t) > _floor(module):
                    upward.append(f"{path.relative_to(ROOT)}:{line}: {module} (floor {_floor(module)}) imports {t}")
    assert not upward, "imports that go up a floor:\n" + "\n".join(upward)


def test_kdloss_imports_nothing_above_it() -> None:
    for module, path in MODULES:
        if module.startswith("kdloss"):
            for line, target, _ in _imports(module, path):
                assert target.startswith("kdloss"), f"{path.relative_to(ROOT)}:{line} imports {target}"


def test_no_module_imports_another_modules_private_names() -> None:
    found = []
    for module, path in MODULES:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        bound: dict[str, str] = {}  # local name -> one of our modules
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = _resolve(module, node)
                if target.split(".")[0] not in PACKAGES:
                    continue
                for alias in node.names:
                    private = alias.name.startswith("_") and not alias.name.startswith("__")
                    if _is_submodule(target, alias.name):
                        bound[alias.asname or alias.name] = f"{target}.{alias.name}"
                    elif private:
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno}: from {target} import {alias.name}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] in PACKAGES and alias.asname:
                        bound[alias.asname] = alias.name
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in bound
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and not _is_submodule(bound[node.value.id], node.attr)
            ):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not found, "private names used outside their module:\n" + "\n".join(found)


def test_the_private_name_check_can_fail(tmp_path: Path) -> None:
    tree = ast.parse("from kdloss.functional.kl import _something\n")
    node = tree.body[0]
    assert isinstance(node, ast.ImportFrom)
    assert node.names[0].name.startswith("_")
    assert not _is_submodule("kdloss.functional.kl", "_something")
    assert _is_submodule("kdloss.kernels", "_selfcheck")  # a private module is its package's, not a private name


def test_the_method_table_is_written_in_one_place() -> None:
    """``METHODS`` is filled in reference_trainers/methods/__init__.py only: no module registers itself."""
    allowed = {"reference_trainers.methods", "reference_trainers.methods.registry"}
    writers = []
    for module, path in MODULES:
        if module in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            call = node if isinstance(node, ast.Call) else None
            name = ""
            if call is not None and isinstance(call.func, ast.Name):
                name = call.func.id
            elif call is not None and isinstance(call.func, ast.Attribute):
                on_table = isinstance(call.func.value, ast.Name) and call.func.value.id == "METHODS"
                name = call.func.attr if on_table else ""
            if name in ("register_method", "update", "setdefault"):
                writers.append(f"{path.relative_to(ROOT)}:{node.lineno}")
            stored = isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Store)
            if stored and isinstance(node.value, ast.Name) and node.value.id == "METHODS":  # type: ignore[attr-defined]
                writers.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not writers, "METHODS written outside reference_trainers/methods/__init__.py: " + ", ".join(writers)


@pytest.mark.parametrize(
    "family", ["logit", "hint", "attention", "relational", "feature", "contrastive", "cohort", "fused_linear"]
)
def test_every_trainer_family_is_named_as_in_kdloss_functional(family: str) -> None:
    assert (ROOT / "kdloss" / "functional" / f"{family}.py").is_file()
    assert (ROOT / "reference_trainers" / "methods" / f"{family}.py").is_file()


def _steps_and_teacher_sides(module: object) -> list[str]:
    """The classes ``module`` defines that are a student side (a ``DistillStep``) or a teacher side
    (a module whose ``forward`` returns the teacher's outputs as a dict)."""
    import inspect

    from torch import nn

    from reference_trainers.engine import DistillStep

    found = []
    for name, cls in vars(module).items():
        if not inspect.isclass(cls) or cls.__module__ != getattr(module, "__name__", None):
            continue
        returns = str(getattr(getattr(cls, "forward", None), "__annotations__", {}).get("return", ""))
        if issubclass(cls, DistillStep) or (issubclass(cls, nn.Module) and returns.startswith("dict")):
            found.append(name)
    return found


def test_recipes_define_no_student_or_teacher_sides() -> None:
    """A recipe holds an experiment; its steps and teacher sides are in reference_trainers/methods/steps.py."""
    import importlib
    import warnings

    found = []
    for module, path in MODULES:
        if module.startswith("reference_trainers.recipes."):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # the deprecated re-export modules
                names = _steps_and_teacher_sides(importlib.import_module(module))
            found += [f"{path.relative_to(ROOT)}: {name}" for name in names]
    assert not found, "student or teacher sides defined in a recipe:\n" + "\n".join(found)


def test_the_step_check_can_fail() -> None:
    from reference_trainers.methods import steps

    assert {"KDStep", "LMFusedKDStep", "TeacherOutputs", "TeacherTopKSide"} <= set(_steps_and_teacher_sides(steps))
    assert "LMStudent" not in _steps_and_teacher_sides(steps)  # a module returning a tensor is neither


def test_every_method_is_built_in_its_familys_module() -> None:
    from reference_trainers.methods import METHODS

    families = {"logit", "hint", "attention", "relational", "feature", "contrastive", "cohort"}
    for name, entry in METHODS.items():
        home = entry.make.__module__.rsplit(".", 1)[-1]
        assert home in families, f"{name} is built in {entry.make.__module__}"


def test_the_clis_method_defaults_are_the_typed_options() -> None:
    """Every default is written once: the CIFAR recipes' options read the option dataclasses, and CRD's
    settings are kdloss.ContrastMemory's own defaults."""
    import inspect

    import kdloss
    from reference_trainers.__main__ import build_parser
    from reference_trainers.methods import (
        AttentionOptions,
        CohortOptions,
        ContrastiveOptions,
        HintOptions,
        MethodSetup,
    )

    memory = inspect.signature(kdloss.ContrastMemory).parameters
    crd = ContrastiveOptions()
    for name, value in (("feat_dim", crd.feat_dim), ("n_negatives", crd.n_negatives)):
        assert memory[name].default == value
    assert (memory["temperature"].default, memory["momentum"].default) == (crd.temperature, crd.momentum)
    args = build_parser().parse_args(["benchmark-cifar100"])
    assert (args.crd_feat_dim, args.crd_nce_k, args.crd_nce_t, args.crd_nce_m) == (
        crd.feat_dim,
        crd.n_negatives,
        crd.temperature,
        crd.momentum,
    )
    assert (args.hint_weight, args.fitnet_stage1_epochs) == (HintOptions().weight, HintOptions().stage1_epochs)
    assert args.at_beta == AttentionOptions().beta
    assert args.head_epochs == CohortOptions().head_epochs
    assert args.init_epochs == MethodSetup("s", "t", None, 10, 4.0, 1.0, 0.9).init_epochs  # type: ignore[arg-type]
