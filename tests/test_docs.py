"""The docs' code runs as written, every page is in the site's navigation, and the docs and the code
stand on their own: no reference to files outside the repository or to how it was developed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _block(page: str, marker: str) -> str:
    text = (DOCS / page).read_text(encoding="utf-8")
    found = re.search(rf"<!-- {marker}:start -->\s*```python\n(.*?)```\s*<!-- {marker}:end -->", text, re.S)
    if found is None:
        raise AssertionError(f"no ```python block between the {marker} markers in docs/{page}")
    return found.group(1)


def _run(page: str, marker: str, namespace: dict[str, object] | None = None) -> dict[str, object]:
    namespace = {} if namespace is None else namespace
    torch.manual_seed(0)
    exec(compile(_block(page, marker), str(DOCS / page), "exec"), namespace)
    return namespace


# ------------------------------------------------------------------------------------ snippets


def test_attention_guide_runs_with_the_papers_beta() -> None:
    ns = _run("attention.md", "attention")
    attention, parts, student = ns["attention"], ns["parts"], ns["student"]
    assert attention.beta == 1000.0  # type: ignore[attr-defined]
    assert set(parts) == {"ce", "kd", "at", "total"}  # type: ignore[arg-type]
    assert float(parts["at"]) > 0  # type: ignore[index]
    assert all(p.grad is not None for p in student.parameters())  # type: ignore[attr-defined]


def test_featuretap_snippet_runs() -> None:
    pytest.importorskip("torchvision")
    ns = _run("featuretap.md", "featuretap")
    student = ns["student"]
    assert student.layer2[0].conv1.weight.grad is not None  # type: ignore[attr-defined]
    assert float(ns["loss"]) > 0  # type: ignore[arg-type]


def test_crd_snippet_fits_torchvision_resnets() -> None:
    """The guide's widths are the ResNets' own: 512 (ResNet-18) and 2048 (ResNet-50) after avgpool."""
    pytest.importorskip("torchvision")
    base = torch.utils.data.TensorDataset(torch.randn(128, 3, 32, 32), torch.randint(0, 100, (128,)))
    ns = _run("crd.md", "crd", {"base_train_set": base, "device": "cpu"})
    crd = ns["crd"]
    assert (crd.embed_student.linear.in_features, crd.embed_teacher.linear.in_features) == (512, 2048)  # type: ignore[attr-defined]
    assert torch.isfinite(ns["loss"])  # type: ignore[arg-type]


def test_the_library_only_example_runs_without_the_extras(tmp_path: Path) -> None:
    """What `pip install .` gives: torch and kdloss, no torchvision, tqdm, matplotlib, numpy or pillow."""
    hide = (
        "import sys\nfor name in ('torchvision', 'tqdm', 'matplotlib', 'numpy', 'PIL'):\n    sys.modules[name] = None\n"
    )
    script = tmp_path / "example.py"
    script.write_text(hide + _block("install.md", "install:library"), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "'ce':" in proc.stdout
    assert "'hint':" in proc.stdout


def test_the_readme_quickstart_names_the_install_it_needs() -> None:
    """The README's quickstart builds torchvision's ResNets: the README says which install has them."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert re.search(r"^import .*\btorchvision\b", _block_readme(readme), re.M)
    assert "pip install '.[trainers]'" in readme.split("<!-- quickstart:start -->")[0]


def _block_readme(readme: str) -> str:
    found = re.search(r"<!-- quickstart:start -->\s*```python\n(.*?)```", readme, re.S)
    assert found is not None
    return found.group(1)


# ------------------------------------------------------------------------------------ the site


def test_every_page_is_in_the_navigation() -> None:
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    pages = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
    missing = [p for p in pages if p not in nav]
    assert not missing, f"pages not in mkdocs.yml's nav: {missing}"
    for page in ("install.md", "troubleshooting.md", "attention.md"):
        assert page in pages


def test_architecture_worked_example_adds_a_method_end_to_end() -> None:
    from reference_trainers.methods import METHODS, MethodSetup, get_method
    from reference_trainers.models import build_model

    try:
        ns = _run("architecture.md", "worked-example")
        entry = get_method("logit-mse")
        assert entry.make is ns["make_logit_mse"]
        setup = MethodSetup("lightnn", "lightnn", build_model("lightnn", 10).eval(), 10, 4.0, 1.0, 0.9)
        built = entry.make(setup)
        step = built.build()
        x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
        assert built.teacher is not None
        out = step(x, y, built.teacher(x))
        assert sorted(out.parts) == ["ce", "logit_mse", "total"]
        out.total.backward()
        assert all(p.grad is not None for p in step.student.parameters())
    finally:
        METHODS.pop("logit-mse", None)


# ------------------------------------------------------------------------------------ standing alone

# What a user outside this repository cannot follow: a notes file that is not in it, folders
# and absolute paths of a development machine, and the tracker's issue numbers.
FORBIDDEN = {
    "EXPERIMENTS.md": re.compile(r"EXPERIMENTS\.md"),
    "a folder outside the repository": re.compile(r"\.\./shared|shared/data|/work/"),
    "an issue number": re.compile(r"\bissues? #?\d", re.I),
    "wording about the tracker's issues": re.compile(r"\bthe issue'?s\b|\(issue\)", re.I),
}
NOT_YET: set[str] = set()  # files allowed to break these rules for now (none)


def _tracked_text_files() -> list[Path]:
    files = []
    for folder in ("docs", "reference_trainers", "kdloss", "tests", "benchmarks"):
        files += [p for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".md", ".yml", ".toml")]
    files += [ROOT / "README.md", ROOT / "mkdocs.yml", ROOT / "pyproject.toml", ROOT / "CHANGELOG.md"]
    return [p for p in files if p.is_file() and p != Path(__file__).resolve()]


@pytest.mark.parametrize("what", sorted(FORBIDDEN))
def test_docs_and_code_stand_on_their_own(what: str) -> None:
    hits = []
    for path in _tracked_text_files():
        rel = str(path.relative_to(ROOT))
        if rel in NOT_YET:
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if FORBIDDEN[what].search(line):
                hits.append(f"{rel}:{n}: {line.strip()[:100]}")
    assert not hits, f"{what}:\n" + "\n".join(hits)


def test_fast_is_claimed_only_with_a_measurement() -> None:
    """The package's one-line descriptions make no speed claim: the measured tables say where kdloss is faster."""
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    description = re.search(r'^description = "(.*)"$', pyproject, re.M)
    assert description is not None
    site = re.search(r"^site_description: (.*)$", (ROOT / "mkdocs.yml").read_text(encoding="utf-8"), re.M)
    assert site is not None
    for text in (description.group(1), site.group(1)):
        assert "fast" not in text.lower(), text
