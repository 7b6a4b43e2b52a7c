"""What a configspec check expects, in words, and where in the file a mistake is, for the
config reader's error messages.

``integer(min=1)`` fails on "soon" with validate's "the value "soon" is of the wrong type";
``problem_text`` adds what was expected ("(expected an integer)", "(expected one of: mail,
rcpt, data)"), so the operator reads the fix in the error line itself.
"""

from __future__ import annotations

from typing import Any

from validate import VdtTypeError

#: What a configspec check takes, in words, for "expected ..." in an error.
EXPECTED = {"integer": "an integer", "float": "a number", "boolean": "yes or no (true/false, on/off, 1/0)",
            "string": "a string", "path": "a path", "ip_addr": "an IP address", "list": "a list",
            "force_list": "a list", "string_list": "a list of strings", "int_list": "a list of integers",
            "float_list": "a list of numbers", "path_list": "a list of paths", "bool_list": "a list of yes/no"}


def check_of(configspec: Any, sections: list[str] | tuple[str, ...], key: str | None) -> str:
    """The configspec check of ``key`` in ``sections`` ("integer(min=1, default=5)"), or ""."""
    try:
        for part in sections:
            configspec = configspec[part]
        return str(configspec[key]) if key is not None else ""
    except (KeyError, TypeError):
        return ""


def problem_text(problem: Any, check: str) -> str:
    """The validator's complaint, and for a wrong type or value what was expected instead."""
    text = str(problem)
    name = check.split("(", 1)[0].strip()
    if name == "option":
        choices = [c.strip().strip("'\"") for c in check.split("(", 1)[1].rsplit(")", 1)[0].split(",")]
        choices = [c for c in choices if c and not c.startswith("default=")]
        return f"{text} (expected one of: {', '.join(choices)})"
    if isinstance(problem, VdtTypeError) and name in EXPECTED:
        return f"{text} (expected {EXPECTED[name]})"
    return text


__all__ = ["EXPECTED", "check_of", "problem_text"]


# -- where in the ini file ------------------------------------------------------------------

def line_of(path: str, sections: list[str], key: str | None) -> int | str:
    """The line of ``key`` in ``sections`` of the ini at ``path``, for an error found later."""
    return _locate(_read_lines(path), sections, key)


def _read_lines(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read().splitlines()
    except OSError:
        return []


def _locate(lines: list[str], sections: list[str] | tuple[str, ...], key: str | None) -> int | str:
    """The 1-based line of ``key`` in ``sections`` (or of the section, when key is None)."""
    stack: list[str] = []
    section_line: int | str = "?"
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if line.startswith("["):
            depth = len(line) - len(line.lstrip("["))
            name = line.strip("[] \t").split("#")[0].strip("[] \t")
            stack = stack[:depth - 1] + [name]
            if stack == list(sections):
                section_line = number
                if key is None:
                    return number
            continue
        if stack == list(sections) and key is not None and "=" in line:
            if line.split("=", 1)[0].strip() == key:
                return number
    return section_line


def _first_sentence(error: Exception) -> str:
    return str(error).splitlines()[0].rstrip(".")
