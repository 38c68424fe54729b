"""README.md and docs/ stay true to the code: their imports resolve and the files they name exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def python_imports() -> list[tuple[str, str]]:
    """Every ``from bgplugin... import ...`` / ``import bgplugin...`` statement of the pages' Python blocks."""
    found = []
    for page in PAGES:
        for block in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S):
            for statement in re.findall(
                r"^(?:from bgplugin[\w.]* import (?:\([^)]*\)|[^\n]*)|import bgplugin[\w.]*)", block, flags=re.M
            ):
                found.append((page.name, re.sub(r"#[^\n]*", "", statement).strip()))
    return found


def test_the_pages_have_python_examples() -> None:
    assert len(python_imports()) >= 40  # 58 when this test was written: a parser that finds none tests nothing


@pytest.mark.parametrize("page, statement", python_imports())
def test_documented_imports_resolve(page: str, statement: str) -> None:
    exec(statement, {})  # an ImportError names what a rename left behind in the page


def test_files_named_in_the_pages_exist() -> None:
    pattern = re.compile(r"(?<![\w/.-])((?:docs|scripts|protocols)/[\w./-]+\.(?:md|py|yaml))")
    named = {(page.name, match) for page in PAGES for match in pattern.findall(page.read_text())}
    assert len(named) >= 10
    missing = sorted((page, path) for page, path in named if not (ROOT / path).is_file())
    assert not missing, missing
