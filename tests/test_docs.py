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


def documented_commands() -> list[tuple[str, str]]:
    """``bgplugin run|bench|info ...`` lines of the pages, leaving out usage lines with ``[...]``, ``|`` or ``...``."""
    found = []
    for page in PAGES:
        text = page.read_text()
        commands = re.findall(r"`(bgplugin (?:run|bench|info)[^`]*)`", text)
        for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S):
            commands += [line.split("#")[0].strip() for line in block.splitlines() if line.startswith("bgplugin ")]
        found += [(page.name, c) for c in commands if not any(mark in c for mark in ("[", "|", "..."))]
    return found


def test_documented_commands_parse() -> None:
    import argparse
    import contextlib
    import io
    import shlex

    from bgplugin.benchmarks import eacf, mcmc
    from bgplugin.cli import build_parser

    own_options = {"eacf": eacf.add_arguments, "mcmc": mcmc.add_arguments}  # benches that parse their own options

    def parses(words: list[str]) -> bool:
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                args, extra = build_parser().parse_known_args(words)
                if getattr(args, "passes_options", False):
                    parser = argparse.ArgumentParser()
                    own_options[words[1]](parser)
                    parser.parse_args(extra)
                    return True
        except SystemExit:
            return False
        return not extra

    def options_of(words: list[str]) -> str:
        if words[:2] in (["bench", "eacf"], ["bench", "mcmc"]):
            parser = argparse.ArgumentParser()
            own_options[words[1]](parser)
            return parser.format_help()
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            build_parser().parse_args([*words[: 2 if words[0] == "bench" else 1], "--help"])
        return out.getvalue()

    commands = documented_commands()
    assert len(commands) >= 50  # 81 when this test was written
    refused = []
    for page, command in commands:
        words = ["1" if re.fullmatch(r"[A-Z][A-Z0-9_]*", w) else w for w in shlex.split(command)[1:]]  # DIR, LR
        if parses(words):
            continue
        # prose naming a flag ("`bgplugin bench eacf --transforms`"): the flag must exist
        flag = words[-1]
        known = flag.startswith("--") and re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", options_of(words))
        if not (known and parses(words[:-1])):
            refused.append((page, command))
    assert not refused, refused
