"""The architecture the README's layout table states: every part of ``luvc`` is listed, and each imports
only the parts listed above it (imports under ``TYPE_CHECKING`` aside), so there are no import cycles."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "luvc"


def layers() -> list[str]:
    """The ``luvc`` rows of the README's layout table, lowest first: ``errors.py``, ``registry/``, ..."""
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Layout"):readme.index("## Command line")]
    return re.findall(r"^\| `luvc/([^`]+)` \|", table, flags=re.M)


def part_of(module: str) -> str | None:
    """The row a dotted ``luvc`` module belongs to (None for the package's public ``luvc`` itself)."""
    parts = module.split(".")[1:]
    if not parts:
        return None
    return f"{parts[0]}/" if (PACKAGE / parts[0]).is_dir() else f"{parts[0]}.py"


def imports(path: Path) -> set[str]:
    """The ``luvc`` modules ``path`` imports anywhere, outside ``if TYPE_CHECKING:`` blocks."""
    tree = ast.parse(path.read_text())
    typing_only = {id(node) for block in ast.walk(tree)
                   if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
                   for node in ast.walk(block)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module == "luvc":  # from luvc import hf: the submodule
            found.update(f"luvc.{alias.name}" if part_of(f"luvc.{alias.name}") in on_disk() else "luvc"
                         for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "luvc":
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "luvc")
    return found


def on_disk() -> set[str]:
    """The package's parts as the table names them: ``errors.py``, ``registry/``, ..."""
    return {f"{p.name}/" if p.is_dir() else p.name for p in PACKAGE.iterdir()
            if p.name != "__init__.py" and not p.name.startswith((".", "__pycache__"))}


def test_the_layout_table_lists_every_part_of_the_package():
    assert sorted(layers()) == sorted(on_disk())


def test_each_part_imports_only_the_parts_above_it():
    rank = {part: i for i, part in enumerate(layers())}
    api = rank["api.py"]
    upward = []
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE)
        if relative.name == "__init__.py" and len(relative.parts) == 1:
            continue  # the public ``luvc`` namespace re-exports the api
        own = f"{relative.parts[0]}/" if len(relative.parts) > 1 else relative.name
        for module in imports(path):
            target = part_of(module)
            allowed = rank[own] > api if target is None else target == own or rank[target] < rank[own]
            if not allowed:
                upward.append(f"{relative} imports {module}")
    assert not upward, "imports against the layout table:\n" + "\n".join(sorted(upward))
