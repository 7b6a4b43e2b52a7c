"""docs/operating-under-attack.md names a test for every claim: each one it names exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "operating-under-attack.md"


def test_every_test_the_page_names_exists():
    text = DOC.read_text(encoding="utf-8")
    named = re.findall(r"`(tests/[\w/]+\.py)((?:::\w+)?)`", text)
    # "::name" right after a file also applies to a following "`::other`" on the same line.
    for line in text.splitlines():
        files = re.findall(r"`(tests/[\w/]+\.py)", line)
        for extra in re.findall(r"`::(\w+)`", line):
            named.append((files[-1], f"::{extra}"))
    assert len(named) >= 25
    for path, function in named:
        source = ROOT / path
        assert source.is_file(), path
        if function:
            functions = {node.name for node in ast.walk(ast.parse(source.read_text(encoding="utf-8")))
                         if isinstance(node, ast.FunctionDef)}
            assert function[2:] in functions, f"{path}{function}"
