"""Transforms are pure functions of token state: they import nothing from the model glue (runtime, adapters)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TRANSFORMS = Path(__file__).resolve().parents[2] / "luvc" / "transforms"
GLUE = ("luvc.runtime", "luvc.models")


def imported_modules(source: str) -> set[str]:
    """Every module an ``import`` or ``from ... import`` in ``source`` names (relative imports resolved
    against ``luvc.transforms``), with ``module.name`` for each name taken from a package."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(["luvc", "transforms"][:3 - node.level] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return found


def test_the_check_sees_plain_from_and_relative_imports():
    source = "import luvc.runtime.llm\nfrom luvc import models\nfrom ..runtime import hf\n"
    assert {"luvc.runtime.llm", "luvc.models", "luvc.runtime.hf"} <= imported_modules(source)


@pytest.mark.parametrize("path", sorted(TRANSFORMS.glob("*.py")), ids=lambda p: p.name)
def test_transform_module_imports_no_model_glue(path):
    glue = sorted(m for m in imported_modules(path.read_text()) if m.startswith(GLUE))
    assert not glue, f"{path.name} imports {glue}: take what a layer computes through registry.AttentionProbe"
