"""Every page of the docs runs: its Python and bash blocks, in page order.

Snippet includes (``--8<-- "path"``) are resolved first, so included files run as shown.
``console`` blocks (installation commands) and ``text``/``yaml`` blocks are not run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted((ROOT / "docs").rglob("*.md"))
FENCE = re.compile(r"^```(\w+)\n(.*?)^```", flags=re.S | re.M)
SNIPPET = re.compile(r'^--8<-- "([^"]+)"$', flags=re.M)


def blocks(page: Path) -> list[tuple[str, str]]:
    """(language, code) of every fenced block, in page order, snippets resolved."""
    return [(lang, SNIPPET.sub(lambda m: (ROOT / m.group(1)).read_text(), body))
            for lang, body in FENCE.findall(page.read_text())]


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT / "docs")) for p in PAGES])
def test_page_runs(page, monkeypatch):
    """Python blocks run in one namespace per page and bash blocks in the repo root, in page order."""
    monkeypatch.chdir(ROOT)
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    for lang, block in blocks(page):
        if lang == "python":
            exec(compile(block, str(page), "exec"), namespace)
        elif lang == "bash":
            result = subprocess.run(["bash", "-e", "-c", block], cwd=ROOT, env=env, capture_output=True, text=True,
                                    timeout=300)
            assert result.returncode == 0, f"{page.name}: `{block.strip()}` failed:\n{result.stdout}\n{result.stderr}"


def test_snippets_point_at_real_files():
    for page in PAGES:
        for path in SNIPPET.findall(page.read_text()):
            assert (ROOT / path).is_file(), f"{page.name} includes missing {path}"


def test_figures_script_runs(tmp_path):
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import gen_figures
    finally:
        sys.path.pop(0)
    for path in gen_figures.main(tmp_path):
        assert path.stat().st_size > 10_000


def test_support_matrix_is_the_registry():
    """docs/support.md's adapter table is what ``python -m luvc.models.support`` generates from the registry."""
    from luvc.models.support import BEGIN, END, support_table

    page = (ROOT / "docs" / "support.md").read_text()
    assert page.count(BEGIN) == 1 and page.count(END) == 1
    shown = page[page.index(BEGIN):page.index(END) + len(END)]
    assert shown == support_table(), "regenerate it: python -m luvc.models.support"
