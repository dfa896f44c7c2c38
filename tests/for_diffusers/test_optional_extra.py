"""diffusers and peft are an optional extra: only ``layerflow.for_diffusers`` may import them."""

from __future__ import annotations

import ast

from conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "sat" / "layerflow"
EXTRA = {"diffusers", "peft"}


def imported_top_levels(source: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_only_the_diffusers_package_imports_the_extra():
    wrong = [
        str(path.relative_to(PACKAGE))
        for path in sorted(PACKAGE.rglob("*.py"))
        if "for_diffusers" not in path.relative_to(PACKAGE).parts
        and imported_top_levels(path.read_text(encoding="utf-8")) & EXTRA
    ]
    assert wrong == []


def test_the_reader_sees_nested_imports():
    assert imported_top_levels("def f():\n    from diffusers.models import x\n    import peft.utils\n") == EXTRA
