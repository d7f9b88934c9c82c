"""The public API's documentation cannot rot: every exported name is documented and listed.

For every name in ``kdloss.__all__`` and ``kdloss.functional.__all__``: a docstring with a
one-line summary and an ``Example:`` section holding a doctest (pytest runs it, see
``--doctest-modules``); functions and classes taking arguments say them in ``Args:``; the name
appears on a page of ``docs/api/`` (what mkdocs renders) and in ``CHANGELOG.md``. Type aliases
(``Reduction``) carry their docstring as a string literal after the assignment, which ``inspect``
cannot read: that literal must exist.
"""

from __future__ import annotations

import ast
import inspect
import itertools
import re
import typing
from pathlib import Path

import pytest

import kdloss
import kdloss.functional

ROOT = Path(__file__).resolve().parent.parent
DOCS_API = ROOT / "docs" / "api"
CHANGELOG = ROOT / "CHANGELOG.md"

PUBLIC: list[tuple[str, str, object]] = [
    *(("kdloss", n, getattr(kdloss, n)) for n in kdloss.__all__ if n != "__version__"),
    *(("kdloss.functional", n, getattr(kdloss.functional, n)) for n in kdloss.functional.__all__),
]
IDS = [f"{mod}.{name}" for mod, name, _ in PUBLIC]


def _is_alias(obj: object) -> bool:
    return typing.get_origin(obj) is not None


def _alias_docstring(name: str) -> str:
    """The docstring written under ``name = ...`` in any module of the package ('' if none)."""
    for path in sorted((ROOT / "kdloss").rglob("*.py")):
        body = ast.parse(path.read_text(encoding="utf-8")).body
        for node, nxt in itertools.pairwise(body):
            named = isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets)
            doc = nxt.value.value if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) else None
            if named and isinstance(doc, str):
                return doc
    return ""


def _docs_text() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted(DOCS_API.glob("*.md")))


def _mentioned(name: str, text: str) -> bool:
    return re.search(rf"(?<![\w.]){re.escape(name)}\b|\.{re.escape(name)}\b", text) is not None


def _takes_arguments(obj: object) -> bool:
    target = obj.__init__ if inspect.isclass(obj) else obj  # type: ignore[misc]
    try:
        params = inspect.signature(target).parameters  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return any(p.name not in ("self", "args", "kwargs") for p in params.values())


def test_all_is_sorted_and_unique() -> None:
    for names in (kdloss.__all__, kdloss.functional.__all__):
        assert len(set(names)) == len(names)
        assert list(names) == sorted(names)


@pytest.mark.parametrize(("module", "name", "obj"), PUBLIC, ids=IDS)
def test_docstring_has_summary_args_and_example(module: str, name: str, obj: object) -> None:
    if _is_alias(obj):  # a type alias: its docstring is the string literal after its assignment
        assert _alias_docstring(name), f"{module}.{name}: a type alias without a docstring after it"
        return
    doc = inspect.getdoc(obj)
    assert doc, f"{module}.{name} has no docstring"
    summary = doc.splitlines()[0]
    assert summary.strip(), f"{module}.{name}: the docstring must start with a one-line summary"
    assert re.search(r"^Example[s]?:\s*$", doc, re.MULTILINE), f"{module}.{name}: no 'Example:' section"
    assert ">>> " in doc, f"{module}.{name}: the Example has no doctest"
    if (inspect.isfunction(obj) or inspect.isclass(obj)) and _takes_arguments(obj):
        has_args = re.search(r"^(Args|Attributes):\s*$", doc, re.MULTILINE)
        assert has_args, f"{module}.{name}: takes arguments but has no 'Args:' section"


@pytest.mark.parametrize(("module", "name", "obj"), PUBLIC, ids=IDS)
def test_listed_in_docs_api_and_changelog(module: str, name: str, obj: object) -> None:
    assert _mentioned(name, _docs_text()), f"{module}.{name} is not on any docs/api/*.md page"
    assert _mentioned(name, CHANGELOG.read_text(encoding="utf-8")), f"{module}.{name} is not in CHANGELOG.md"


def test_the_check_can_fail() -> None:
    assert not _mentioned("no_such_name", _docs_text())
    assert _mentioned("soft_kl", "::: kdloss.functional.soft_kl")
    assert not _mentioned("kl", "::: kdloss.functional.soft_kl")


@pytest.mark.parametrize(
    ("cls", "first"),
    [
        (kdloss.KDCELoss, "alpha"),
        (kdloss.CohortLoss, "temperature"),
        (kdloss.MultiHeadKDLoss, "temperature"),
        (kdloss.TOFDLoss, "temperature"),
        (kdloss.SelfDistillationLoss, "temperature"),
        (kdloss.KDLoss, "temperature"),
    ],
)
def test_alpha_and_temperature_are_never_positional_in_two_orders(cls: type, first: str) -> None:
    """KDCELoss took (alpha, temperature) and CohortLoss (temperature, alpha): the second of the two is
    keyword-only everywhere, so a positional call written for one order cannot run with the other."""
    params = list(inspect.signature(cls).parameters.values())
    assert params[0].name == first
    assert params[0].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[1:]), params
    with pytest.raises(TypeError, match="positional argument"):
        cls(0.5, 0.9)
    assert cls(**{first: 0.5}) is not None  # keywords keep working
