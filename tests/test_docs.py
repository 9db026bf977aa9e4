"""The documentation's code: every block of the README and of the docs site runs.

Every page with Python (the README, the quick start, the tutorial, the how-to,
coming-from and older reference pages) holds complete programs against the in-process
fake server: each ```python block is executed, in a fresh module, and must finish
without an error or a warning. A block preceded by a ``<!-- skip -->`` line (one that
needs a real key) is only compiled. Signatures sketched for reference are ```text blocks.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
RUNNABLE = [
    *sorted(
        [
            DOCS / "index.md",
            DOCS / "tutorial.md",
            *DOCS.glob("howto-*.md"),
            *DOCS.glob("coming-from-*.md"),
            DOCS / "batch.md",
            DOCS / "serving.md",
            DOCS / "several-machines.md",
            DOCS / "anthropic.md",
            DOCS / "fan-out-and-rate-limits.md",
            DOCS / "performance.md",
        ]
    ),
    ROOT / "README.md",
]
EVERY_PAGE = [*sorted(DOCS.glob("*.md")), ROOT / "README.md"]
SKIP_MARKER = "<!-- skip -->"


def python_blocks(page: Path) -> list[tuple[int, str, bool]]:
    """Each ```python block of ``page``: (line number, code, marked to skip)."""
    text = page.read_text(encoding="utf-8")
    blocks = []
    for match in re.finditer(r"^```python[^\n]*\n(.*?)^```\s*$", text, re.M | re.S):
        line = text.count("\n", 0, match.start()) + 1
        before = text[: match.start()].rstrip().splitlines()
        skip = bool(before) and before[-1].strip() == SKIP_MARKER
        blocks.append((line, match[1], skip))
    return blocks


def block_ids(pages: list[Path], *, runnable: bool) -> list[pytest.param]:
    """pytest params for every block of ``pages`` (only those to execute if ``runnable``)."""
    params = []
    for page in pages:
        for line, code, skip in python_blocks(page):
            if runnable and skip:
                continue
            params.append(pytest.param(page, line, code, id=f"{page.name}:{line}"))
    return params


def test_runnable_pages_exist_and_have_blocks() -> None:
    """Each page written to be run holds at least one block that is executed."""
    assert len(RUNNABLE) >= 9
    for page in RUNNABLE:
        assert any(not skip for _, _, skip in python_blocks(page)), page.name


def test_every_page_with_python_is_runnable() -> None:
    """Every page holding ```python blocks is in RUNNABLE: none keeps fragments that never run."""
    with_python = {page for page in EVERY_PAGE if python_blocks(page)}
    assert with_python <= set(RUNNABLE), sorted(p.name for p in with_python - set(RUNNABLE))


@pytest.mark.parametrize(("page", "line", "code"), block_ids(RUNNABLE, runnable=True))
def test_block_runs(page: Path, line: int, code: str) -> None:
    """The block runs to completion as a program, offline, within a few seconds."""
    name = f"_docs_{page.stem.replace('-', '_')}_{line}"
    module = types.ModuleType(name)
    sys.modules[name] = module  # so typing.get_type_hints finds the block's globals
    try:
        start = time.monotonic()
        exec(compile(code, f"{page.name}:{line}", "exec"), module.__dict__)
        assert time.monotonic() - start < 30
    finally:
        del sys.modules[name]


@pytest.mark.parametrize(("page", "line", "code"), block_ids(EVERY_PAGE, runnable=False))
def test_block_compiles(page: Path, line: int, code: str) -> None:
    """Every block of every page is valid Python (top-level await allowed)."""
    compile(code, f"{page.name}:{line}", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


def test_every_page_is_in_the_site_nav() -> None:
    """mkdocs.yml lists every page of docs/, so none is left out of the site."""
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    listed = set(re.findall(r":\s*([\w-]+\.md)\s*$", config, re.M))
    assert listed == {page.name for page in DOCS.glob("*.md")}


@pytest.mark.skipif(
    shutil.which("mkdocs") is None and not (Path(sys.executable).parent / "mkdocs").exists(),
    reason="the docs extra is not installed",
)
@pytest.mark.skipif(
    not (DOCS / "peers.png").exists(),
    reason="docs/peers.png (benchmarks/peers.py --chart) not generated yet",
)
def test_site_builds_strictly(tmp_path: Path) -> None:
    """`mkdocs build --strict` passes: no broken link, no docstring mkdocstrings cannot read."""
    mkdocs = Path(sys.executable).parent / "mkdocs"
    done = subprocess.run(
        [str(mkdocs if mkdocs.exists() else "mkdocs"), "build", "--strict", "-d", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
