"""The optional compiled build (setup.py's MYPYC_MODULES): a run imports what it says it runs.

CI runs tests/unit twice: pure from the checkout, and against the wheel tools/build-compiled
installs in .venv-compiled with QPGEVENT_EXPECT_COMPILED=1 and PYTHONSAFEPATH=1 (which keeps
the checkout, the current folder, off sys.path, here and in the servers the tests start). In the compiled run every listed
module must come from an extension module, not from a .py (else the second run would test the
pure code again and prove nothing); in the pure run none may (a stale .so beside the sources
would silently replace the code under test).
"""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXPECT_COMPILED = os.environ.get("QPGEVENT_EXPECT_COMPILED") == "1"


def mypyc_modules() -> list[str]:
    """setup.py's MYPYC_MODULES (read, not run: setup.py calls setup() when imported)."""
    tree = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "MYPYC_MODULES" for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise AssertionError("setup.py has no MYPYC_MODULES literal")


def module_names() -> list[str]:
    return [path.removesuffix(".py").replace("/", ".") for path in mypyc_modules()]


def test_the_list_names_modules_of_the_package() -> None:
    paths = mypyc_modules()
    assert paths and len(set(paths)) == len(paths)
    missing = [path for path in paths if not (ROOT / path).is_file()]
    assert not missing, f"MYPYC_MODULES names files that do not exist: {missing}"


@pytest.mark.parametrize("name", module_names())
def test_the_module_is_compiled_exactly_when_the_run_says_so(name: str) -> None:
    module = importlib.import_module(name)
    origin = Path(module.__file__ or "")
    if EXPECT_COMPILED:
        assert origin.suffix == ".so", f"{name} was imported from {origin}, not the compiled build"
        # The installed wheel, not a .so built in place beside the checkout's sources.
        assert ROOT / "qpgevent" not in origin.parents, f"{name} was built in place in the checkout: {origin}"
    else:
        assert origin.suffix == ".py", f"{name} was imported from {origin} in a pure run (a stale build?)"


def test_a_server_the_tests_start_runs_the_same_build() -> None:
    """Tests start servers as ``python -m qpgevent`` from the checkout (ServerProcess): without
    PYTHONSAFEPATH those would import the checkout's pure sources even in the compiled run."""
    probe = "import qpgevent.core.protocol as m; print(m.__file__)"
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          check=True)
    assert Path(done.stdout.strip()).suffix == (".so" if EXPECT_COMPILED else ".py"), done.stdout


def test_a_pure_run_finds_no_compiled_module_beside_the_sources() -> None:
    # An in-place build (mypyc FILE.py, build_ext --inplace) leaves FILE.*.so and a *__mypyc*.so.
    found = [*(ROOT / "qpgevent").rglob("*.so"), *ROOT.glob("*__mypyc*.so")]
    stale = sorted(str(path.relative_to(ROOT)) for path in found)
    assert not stale, f"compiled modules beside the sources would shadow them: {stale}"
