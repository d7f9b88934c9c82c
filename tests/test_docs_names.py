"""Every loss class the docs name in code spans exists: in ``kdloss`` or, for the few torch classes
the docs compare with, in ``torch.nn``. (``docs/methods/index.md`` once named an ``ATLoss`` that never
existed; the class is ``AttentionLoss``.)"""

from __future__ import annotations

import re
from pathlib import Path

import torch

import kdloss

ROOT = Path(__file__).resolve().parent.parent
PAGES = [*sorted((ROOT / "docs").rglob("*.md")), ROOT / "README.md"]
NAME = re.compile(r"`(?:kdloss\.)?([A-Z][A-Za-z0-9]*Loss)\b")


# classes of other projects that the docs compare kdloss with, by name
OTHER_PROJECTS = {"LigerFusedLinearJSDLoss"}


def test_docs_name_only_existing_loss_classes() -> None:
    missing = {}
    for page in PAGES:
        for name in NAME.findall(page.read_text(encoding="utf-8")):
            if not hasattr(kdloss, name) and not hasattr(torch.nn, name) and name not in OTHER_PROJECTS:
                missing.setdefault(name, []).append(str(page.relative_to(ROOT)))
    assert not missing, f"the docs name loss classes that do not exist: {missing}"
