"""The shape of the code (STYLE.md "Shape"): imports point down the layers.

Every module of ``qpgevent/`` and ``plugins/`` is parsed with ``ast`` (nothing is
imported). The layers, lowest first:

0. pure values and protocol: no I/O, stdlib only;
2. the objects plugins see, and the config reader;
3. the plugin base class, the hook runner, the loader;
4. services for plugins (DNS, ident, store, logging) and the metrics and scoreboard they feed;
5. I/O and processes: session, TLS, server, master, CLI, test helpers.

A module may import modules of lower layers, and modules listed before it in its own
layer, so the graph has no cycles. A new module has to be placed in ``LAYERS``, which
is the point: someone decides where it belongs. Plugins import only the plugin API.
Every module starts with a docstring saying what it owns.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "qpgevent"
PLUGINS = ROOT / "plugins"

#: Layer -> its modules, in the order they may import each other.
LAYERS: dict[int, list[str]] = {
    0: ["__init__", "errors", "codes", "address", "wire", "headers", "proxy", "reply", "protocol", "dsn", "schedule"],
    2: ["connection", "transaction", "config"],
    3: ["plugin", "hooks", "loader"],
    4: ["log", "metrics", "scoreboard", "dns", "ident", "policy", "store_base", "store_sqlite", "store_redis",
        "store", "services", "shared_counters", "smtp_client", "scanner", "authresults", "auth",
        "outqueue", "mxroute", "tls_policy", "queue_metrics", "delivery"],
    5: ["tls", "parking", "session", "dryrun", "server", "admin", "privileges", "queue_runner", "queue_tools", "master", "cli", "__main__", "testing", "testing_dns",
        "testing_redis", "testing_mta", "testing_pytest", "testing_scanners", "testing_netlab", "testing_policy_server"],
}
RANK = {name: (layer, i) for layer, names in LAYERS.items() for i, name in enumerate(names)}
#: Standard modules that do I/O or concurrency: not in the pure layer either.
IO_STDLIB = {"socket", "ssl", "select", "selectors", "threading", "asyncio", "signal", "subprocess",
             "multiprocessing", "concurrent", "socketserver", "smtplib", "http", "urllib"}
#: What a plugin may import from qpgevent: the plugin API, nothing of the server.
PLUGIN_API = {"qpgevent.plugin", "qpgevent.address", "qpgevent.dns", "qpgevent.store", "qpgevent.ident",
              "qpgevent.policy", "qpgevent.smtp_client", "qpgevent.scanner", "qpgevent.authresults", "qpgevent.outqueue",
              "qpgevent.tls_policy"}
NEVER_FOR_PLUGINS = {"qpgevent.session", "qpgevent.server", "qpgevent.cli", "qpgevent.hooks",
                     "qpgevent.loader", "qpgevent.config", "qpgevent.testing"}


def package_modules() -> dict[str, Path]:
    return {path.stem: path for path in sorted(PACKAGE.glob("*.py"))}


def plugin_files() -> list[Path]:
    return sorted(PLUGINS.rglob("*.py"))


def imports(source: str, package: str | None = "qpgevent", own: set[str] | None = None) -> set[str]:
    """Every module ``source`` imports, anywhere in the file, as absolute dotted names.

    ``from . import x`` names ``qpgevent.x`` when x is a module of the package (in ``own``),
    else the package itself. Imports under ``if TYPE_CHECKING:`` and inside functions count.
    """
    own = own if own is not None else set(package_modules())
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if package is None:
                    found.add("." * node.level + (node.module or ""))  # a relative import: flagged
                    continue
                base = package if node.level == 1 else "<outside the package>"
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.add(module)
            if module == "qpgevent":
                found.update(f"qpgevent.{alias.name}" for alias in node.names if alias.name in own)
    return found


def internal(names: set[str]) -> set[str]:
    """The qpgevent modules among ``names`` ("qpgevent" itself is ``__init__``)."""
    out = set()
    for name in names:
        if name == "qpgevent":
            out.add("__init__")
        elif name.startswith("qpgevent."):
            out.add(name.split(".")[1])
    return out


def top_level(names: set[str]) -> set[str]:
    return {name.split(".")[0] for name in names if not name.startswith("qpgevent")}


def source_of(module: str) -> str:
    return package_modules()[module].read_text(encoding="utf-8")


# --- the import parser sees what it must -------------------------------------------


def test_the_parser_finds_every_kind_of_import() -> None:
    source = '''
import os, gevent.pool
from . import config as config_module, __version__
from .codes import OK
from qpgevent.reply import answer
from typing import TYPE_CHECKING
if TYPE_CHECKING:
    from .plugin import Plugin
def later():
    import socket
    from qpgevent import hooks
'''
    found = imports(source, own={"config", "codes", "reply", "plugin", "hooks"})
    assert found >= {"os", "gevent.pool", "qpgevent", "qpgevent.config", "qpgevent.codes", "qpgevent.reply",
                     "typing", "qpgevent.plugin", "socket", "qpgevent.hooks"}
    assert internal(found) == {"__init__", "config", "codes", "reply", "plugin", "hooks"}
    assert top_level(found) == {"os", "gevent", "typing", "socket"}


def test_the_parser_sees_the_real_edges() -> None:
    # Known imports of the real code, so that a parser that sees nothing cannot pass.
    assert {"protocol", "reply", "hooks"} <= internal(imports(source_of("session")))
    assert "codes" in internal(imports(source_of("reply")))
    assert "gevent" in top_level(imports(source_of("hooks")))


# --- the package ------------------------------------------------------------------------


@pytest.mark.parametrize("module", list(package_modules()))
def test_every_module_has_a_place_in_the_layers(module: str) -> None:
    assert module in RANK, f"qpgevent/{module}.py: add it to LAYERS in {Path(__file__).name} (see STYLE.md Shape)"


@pytest.mark.parametrize("module", [m for m in package_modules() if m in RANK])
def test_imports_point_down(module: str) -> None:
    upward = sorted(name for name in internal(imports(source_of(module)))
                    if name != module and (name not in RANK or RANK[name] >= RANK[module]))
    assert not upward, (f"qpgevent/{module}.py (layer {RANK[module][0]}) imports {upward}; "
                        "imports must point down the layers")


@pytest.mark.parametrize("module", [m for m in package_modules() if RANK.get(m, (9,))[0] == 0])
def test_pure_layer_imports_only_stdlib_without_io(module: str) -> None:
    outside = top_level(imports(source_of(module)))
    not_stdlib = sorted(name for name in outside if name not in sys.stdlib_module_names)
    io = sorted(outside & IO_STDLIB)
    assert not not_stdlib, f"qpgevent/{module}.py is pure but imports {not_stdlib}"
    assert not io, f"qpgevent/{module}.py is pure but imports I/O modules {io}"


def test_package_init_imports_nothing() -> None:
    # __main__ monkey-patches first; importing the package must not pull in socket & co.
    assert imports(source_of("__init__")) == set()


@pytest.mark.parametrize("module", ["connection", "transaction", "config"])
def test_plugin_objects_and_config_know_nothing_of_the_engine(module: str) -> None:
    assert internal(imports(source_of(module))).isdisjoint({"session", "server", "cli", "hooks", "loader"})


@pytest.mark.parametrize("module", [m for m in package_modules() if not m.startswith("testing")])
def test_runtime_never_imports_test_tools(module: str) -> None:
    names = imports(source_of(module))
    assert not top_level(names) & {"pytest", "unittest"}
    assert not {n for n in internal(names) if n.startswith("testing")}


# --- plugins ------------------------------------------------------------------------------


def test_there_are_plugins_to_check() -> None:
    assert len(plugin_files()) >= 5


@pytest.mark.parametrize("path", plugin_files(), ids=lambda p: str(p.relative_to(PLUGINS)))
def test_plugins_import_only_the_plugin_api(path: Path) -> None:
    names = imports(path.read_text(encoding="utf-8"), package=None)
    relative = sorted(n for n in names if n.startswith("."))
    assert not relative, f"{path.name}: relative imports {relative}; a plugin stands alone"
    ours = {n for n in names if n == "qpgevent" or n.startswith("qpgevent.")}
    # "from qpgevent import plugin" is qpgevent.plugin: read the imported names too.
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "qpgevent":
            ours.discard("qpgevent")
            ours.update(f"qpgevent.{alias.name}" for alias in node.names)
    forbidden = sorted(ours - PLUGIN_API)
    assert not forbidden, f"{path.name} imports {forbidden}; plugins use only {sorted(PLUGIN_API)}"
    assert not ours & NEVER_FOR_PLUGINS
    other_plugins = {p.stem for p in plugin_files()} | {p.name for p in PLUGINS.iterdir() if p.is_dir()}
    # A plugin named after the library it wraps (dkim: dkimpy's "dkim") imports the library:
    # the loader gives plugin modules names of their own, so that is never the plugin itself.
    other_plugins.discard(path.stem)
    siblings = sorted(top_level(names) & (other_plugins | {"plugins", "qpgevent_plugins"}))
    assert not siblings, f"{path.name} imports other plugins {siblings}"


#: Plugin API modules that offer a Plugin base class for a family of plugins to subclass.
PLUGIN_BASES = {"qpgevent.plugin", "qpgevent.smtp_client"}


def test_plugins_import_the_plugin_api() -> None:
    # The check above is not vacuous: every plugin does use the API.
    for path in plugin_files():
        assert PLUGIN_BASES & imports(path.read_text(encoding="utf-8"), package=None), path.name


# --- docstrings ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", [*package_modules().values(), *plugin_files()],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_every_module_has_a_docstring(path: Path) -> None:
    docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
    assert docstring and docstring.strip(), f"{path.relative_to(ROOT)} has no module docstring"
    assert len(docstring.split()) >= 5, f"{path.relative_to(ROOT)}: say what the module owns"
