"""The shape of the code (STYLE.md "Shape"): imports point down the layers, and the folders name them.

Every module of ``qpgevent/`` and ``plugins/`` is parsed with ``ast`` (nothing is
imported). A module's layer is its sub-package, lowest first:

0. ``core``: pure values and protocol: no I/O, stdlib only;
1. the top-level modules: the objects plugins see, the plugin base class, the config reader
   (and the plugin API names, which are aliases of modules below: see ``ALIASES``);
2. ``engine``: the hook table and runner, the loader, the conversation;
3. ``backends``: services for plugins (DNS, ident, stores, scanners, relay clients, logs, metrics);
4. ``server``: I/O and processes (driver, TLS, parking, listener, master, admin, CLI);
5. ``testing``: the public test kit; runtime code never imports it.

A module may import its own package's modules and lower layers' ones; inside a package
the import graph has no cycles. A new module needs no list entry: its folder places it.
Plugins import only the plugin API. Every module starts with a docstring saying what it owns.
"""

from __future__ import annotations

import ast
import functools
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "qpgevent"
PLUGINS = ROOT / "plugins"

#: Sub-package -> layer. "" is the package's top level.
LAYER = {"core": 0, "": 1, "engine": 2, "backends": 3, "server": 4, "testing": 5}
#: Top-level modules outside the ranking: the package marker and the command's entry point.
ENTRY = {"__init__", "__main__"}
#: Standard modules that do I/O or concurrency: not in the pure layer either.
IO_STDLIB = {"socket", "ssl", "select", "selectors", "threading", "asyncio", "signal", "subprocess",
             "multiprocessing", "concurrent", "socketserver", "smtplib", "http", "urllib"}
#: What a plugin may import from qpgevent: the plugin API, nothing of the server.
PLUGIN_API = {"qpgevent.plugin", "qpgevent.address", "qpgevent.codes", "qpgevent.dns", "qpgevent.store",
              "qpgevent.ident", "qpgevent.policy", "qpgevent.smtp_client", "qpgevent.scanner",
              "qpgevent.authresults", "qpgevent.milter_client", "qpgevent.milter_protocol",
              "qpgevent.external", "qpgevent.policy_protocol", "qpgevent.directory", "qpgevent.dovecot",
              "qpgevent.ldap_client", "qpgevent.outqueue", "qpgevent.tls_policy",
              "qpgevent.results", "qpgevent.session", "qpgevent.disk", "qpgevent.maildir"}
NEVER_FOR_PLUGINS = {"qpgevent.server", "qpgevent.engine", "qpgevent.config", "qpgevent.testing"}


def module_name(path: Path) -> str:
    """``qpgevent/server/master.py`` -> ``server.master``; a package's ``__init__`` is the package."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


@functools.cache
def package_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def is_alias(path: Path) -> bool:
    """A plugin API name kept at the top level: the file only makes itself a lower module."""
    return "sys.modules[__name__] = " in path.read_text(encoding="utf-8")


ALIASES = {name for name, path in package_modules().items() if "." not in name and is_alias(path)}


def layer_of(module: str) -> int:
    head = module.split(".")[0]
    return LAYER[head] if head in SUBPACKAGES else LAYER[""]


SUBPACKAGES = {name for name in LAYER if name and (PACKAGE / name).is_dir()}


def plugin_files() -> list[Path]:
    return sorted(PLUGINS.rglob("*.py"))


def imports(source: str, module: str | None = "", own: set[str] | None = None) -> set[str]:
    """Every module ``source`` imports, anywhere in the file, as absolute dotted names.

    ``module`` is the importing module's dotted name under qpgevent ("" for the package;
    None for a file outside it, whose relative imports are flagged with their dots).
    ``from . import x`` names the module ``x`` when it is one (in ``own``), else the package.
    Imports under ``if TYPE_CHECKING:`` and inside functions count.
    """
    own = own if own is not None else set(package_modules())
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if module is None:
                    found.add("." * node.level + (node.module or ""))  # a relative import: flagged
                    continue
                here = ["qpgevent", *[p for p in module.split(".") if p]]
                is_package = module in SUBPACKAGES or module == ""
                base_parts = here if is_package else here[:-1]
                base_parts = base_parts[:len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts)
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            found.add(target)
            prefix = target.removeprefix("qpgevent").lstrip(".")
            if target == "qpgevent" or target.startswith("qpgevent."):
                for alias in node.names:
                    candidate = f"{prefix}.{alias.name}" if prefix else alias.name
                    if candidate in own:
                        found.add(f"qpgevent.{candidate}")
    return found


def internal(names: set[str]) -> set[str]:
    """The qpgevent modules among ``names`` (dotted under qpgevent; "qpgevent" itself is ``__init__``)."""
    out = set()
    for name in names:
        if name == "qpgevent":
            out.add("__init__")
        elif name.startswith("qpgevent."):
            out.add(name.removeprefix("qpgevent."))
    return out


def top_level(names: set[str]) -> set[str]:
    return {name.split(".")[0] for name in names if not name.startswith("qpgevent")}


@functools.cache
def source_of(module: str) -> str:
    return package_modules()[module].read_text(encoding="utf-8")


@functools.cache
def edges(module: str) -> frozenset[str]:
    """The qpgevent modules ``module`` imports (aliases resolved to the module they stand for)."""
    out = set()
    for name in internal(imports(source_of(module), module)):
        if name in ALIASES:
            out.update(n for n in internal(imports(source_of(name), name)) if n != "__init__" and n not in SUBPACKAGES)
        elif name != module:
            out.add(name)
    return frozenset(out)


# --- the import parser sees what it must -------------------------------------------


def test_the_parser_finds_every_kind_of_import() -> None:
    source = '''
import os, gevent.pool
from .. import config as config_module, __version__
from ..core.codes import OK
from . import parking
from qpgevent.core.reply import answer
from typing import TYPE_CHECKING
if TYPE_CHECKING:
    from ..plugin import Plugin
def later():
    import socket
    from qpgevent.engine import hooks
'''
    found = imports(source, "server.session",
                    own={"config", "core.codes", "core.reply", "plugin", "engine.hooks", "server.parking"})
    assert found >= {"os", "gevent.pool", "qpgevent", "qpgevent.config", "qpgevent.core.codes",
                     "qpgevent.core.reply", "typing", "qpgevent.plugin", "socket", "qpgevent.engine.hooks",
                     "qpgevent.server.parking"}
    assert internal(found) >= {"__init__", "config", "core.codes", "core.reply", "plugin", "engine.hooks",
                               "server.parking"}
    assert top_level(found) == {"os", "gevent", "typing", "socket"}


def test_the_parser_sees_the_real_edges() -> None:
    # Known imports of the real code, so that a parser that sees nothing cannot pass.
    assert {"core.protocol", "core.reply", "engine.hooks"} <= edges("engine.conversation")
    assert {"engine.conversation", "server.parking"} <= edges("server.driver")
    assert "core.codes" in edges("core.reply")
    assert "gevent" in top_level(imports(source_of("server.server"), "server.server"))
    assert {"core.address", "backends.dns"} <= ALIASES_TARGETS


ALIASES_TARGETS = {t for name in ALIASES for t in internal(imports(source_of(name), name))
                   if t != "__init__" and t not in SUBPACKAGES}


# --- the package ------------------------------------------------------------------------


def test_the_folders_are_the_layers() -> None:
    assert SUBPACKAGES == {"core", "engine", "backends", "server", "testing"}
    loose = sorted(name for name in package_modules() if "." not in name and name not in SUBPACKAGES
                   and name not in ENTRY and name not in ALIASES)
    assert loose == ["config", "config_checks", "connection", "plugin", "results", "transaction"], (
        "a new top-level module must be part of the plugin API; put anything else in a sub-package")


@pytest.mark.parametrize("module", [m for m in package_modules() if m not in ENTRY and m not in ALIASES])
def test_imports_point_down(module: str) -> None:
    upward = sorted(name for name in edges(module)
                    if name not in ENTRY and layer_of(name) > layer_of(module))
    assert not upward, (f"qpgevent/{module} (layer {layer_of(module)}) imports {upward}; "
                        "imports must point down the layers")


@pytest.mark.parametrize("package", sorted([*SUBPACKAGES, ""]))
def test_no_import_cycles_inside_a_package(package: str) -> None:
    members = [m for m in package_modules() if layer_of(m) == LAYER[package] and m not in ENTRY
               and m not in ALIASES]
    graph = {m: {e for e in edges(m) if e in members} for m in members}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != 1, f"import cycle: {' -> '.join([*path, node, nxt])}"
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for member in members:
        if member not in state:
            visit(member, [])


@pytest.mark.parametrize("module", [m for m in package_modules() if layer_of(m) == 0])
def test_pure_layer_imports_only_stdlib_without_io(module: str) -> None:
    outside = top_level(imports(source_of(module), module))
    not_stdlib = sorted(name for name in outside if name not in sys.stdlib_module_names)
    io = sorted(outside & IO_STDLIB)
    assert not not_stdlib, f"qpgevent/{module} is pure but imports {not_stdlib}"
    assert not io, f"qpgevent/{module} is pure but imports I/O modules {io}"


#: What the engine must never import: it runs whole in memory, driven by the server's I/O
#: (or by a test, the dry run, the plugin harness), so it cannot wait on a socket itself.
ENGINE_FORBIDDEN = {"gevent", "socket", "ssl", "select", "selectors", "asyncio", "threading"}


@pytest.mark.parametrize("module", [m for m in package_modules() if layer_of(m) == LAYER["engine"]])
def test_the_engine_does_no_io(module: str) -> None:
    io = sorted(top_level(imports(source_of(module), module)) & ENGINE_FORBIDDEN)
    assert not io, f"qpgevent/{module} is in the engine but imports {io}: I/O belongs to the server (the driver)"


def test_the_engine_check_sees_the_engine() -> None:
    engine = {m for m in package_modules() if layer_of(m) == LAYER["engine"]}
    assert {"engine.conversation", "engine.hooks", "engine.sasl", "engine.received"} <= engine
    assert "gevent" in top_level(imports(source_of("server.driver"), "server.driver"))


def test_package_init_imports_nothing() -> None:
    # __main__ monkey-patches first; importing the package must not pull in socket & co.
    assert imports(source_of("__init__"), "") == set()


@pytest.mark.parametrize("module", ["connection", "transaction", "config"])
def test_plugin_objects_and_config_know_nothing_of_the_engine(module: str) -> None:
    assert all(layer_of(name) <= LAYER[""] for name in edges(module))


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_plugin_api_aliases_are_the_same_module(alias: str) -> None:
    import importlib
    target, = ALIASES_FOR[alias]
    assert importlib.import_module(f"qpgevent.{alias}") is importlib.import_module(f"qpgevent.{target}")


ALIASES_FOR = {name: [t for t in internal(imports(source_of(name), name)) if t != "__init__" and t not in SUBPACKAGES]
               for name in ALIASES}


@pytest.mark.parametrize("module", [m for m in package_modules() if layer_of(m) < LAYER["testing"]])
def test_runtime_never_imports_test_tools(module: str) -> None:
    names = imports(source_of(module), module)
    assert not top_level(names) & {"pytest", "unittest"}
    assert not {n for n in internal(names) if n.split(".")[0] == "testing"}


# --- plugins ------------------------------------------------------------------------------


def test_there_are_plugins_to_check() -> None:
    assert len(plugin_files()) >= 5


@pytest.mark.parametrize("path", plugin_files(), ids=lambda p: str(p.relative_to(PLUGINS)))
def test_plugins_import_only_the_plugin_api(path: Path) -> None:
    names = imports(path.read_text(encoding="utf-8"), None)
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
    assert not {n for n in ours if any(n == p or n.startswith(p + ".") for p in NEVER_FOR_PLUGINS)}
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
        assert PLUGIN_BASES & imports(path.read_text(encoding="utf-8"), None), path.name


# --- docstrings and size -------------------------------------------------------------------


@pytest.mark.parametrize("path", [*package_modules().values(), *plugin_files()],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_every_module_has_a_docstring(path: Path) -> None:
    docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
    assert docstring and docstring.strip(), f"{path.relative_to(ROOT)} has no module docstring"
    assert len(docstring.split()) >= 5, f"{path.relative_to(ROOT)}: say what the module owns"
