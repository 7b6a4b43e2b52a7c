"""Finding, importing and checking plugins named in qpsmtpd.ini.

A name like ``queue/maildir`` is a file ``queue/maildir.py`` in the first plugin folder
that has it: the ``plugin_dirs`` of the config, then ``plugins/`` beside the ini file,
then the plugins bundled with qpgevent, then the entry points of the ``qpgevent.plugins``
group of installed packages (``name = package.module``). A dotted name
(``mypackage.myplugin``) is imported as a Python module. ``name:2`` is a second
instance of ``name``.

Each module must define exactly one ``Plugin`` subclass. Every ``hook_*`` method must
name a hook of the table and accept its arguments; options are validated against the
class's configspec. Anything wrong is a PluginLoadError naming the plugin and its file.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
import re
import sys
from pathlib import Path
from types import ModuleType

from ..config import PluginSpec, Settings, validate_options
from ..core.errors import ConfigError, PluginLoadError
from .hooks import HOOKS
from ..plugin import Plugin

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(/[A-Za-z_][A-Za-z0-9_]*)*$")
_MODULE_PREFIX = "qpgevent_plugins."
#: Installed packages publish plugins here: ``[project.entry-points."qpgevent.plugins"]``.
ENTRY_POINT_GROUP = "qpgevent.plugins"


def bundled_plugin_dir() -> Path:
    """The plugins shipped with qpgevent: installed inside the package, or in the checkout."""
    package = Path(__file__).resolve().parents[1]  # qpgevent/ (this file is qpgevent/engine/loader.py)
    installed = package / "plugins"
    return installed if installed.is_dir() else package.parent / "plugins"


def plugin_dirs(settings: Settings) -> list[Path]:
    dirs = [Path(d) for d in settings.plugin_dirs]
    dirs += [Path(settings.base_dir) / "plugins", bundled_plugin_dir()]
    unique: list[Path] = []
    for d in dirs:
        if d.resolve() not in [u.resolve() for u in unique]:
            unique.append(d)
    return unique


def load_plugins(settings: Settings) -> list[Plugin]:
    dirs = plugin_dirs(settings)
    return [load_plugin(spec, dirs, settings.base_dir) for spec in settings.plugins]


def forget_plugin_modules() -> None:
    """Drop the plugin modules imported so far, so the next load reads their files again.

    For a reload (SIGHUP) in the master, which serves no session itself: the workers
    already forked keep the modules they were forked with.
    """
    for name in [name for name in sys.modules if name.startswith(_MODULE_PREFIX)]:
        del sys.modules[name]


def load_plugin(spec: PluginSpec, dirs: list[Path], base_dir: str) -> Plugin:
    where = spec.where
    module, path = _import(spec.name, dirs, where)
    cls = _plugin_class(module, path, where)
    for hook in cls.implemented_hooks():
        _check_hook(cls, hook, path, where)
    try:
        options = validate_options(spec, cls.configspec_lines(), base_dir)
    except ConfigError as error:
        raise PluginLoadError(str(error)) from None
    plugin = cls(spec.label, options, path)
    try:
        plugin.setup()
    except (OSError, ValueError) as error:
        raise PluginLoadError(f"{where} setup failed: {error}") from None
    return plugin


def _import(name: str, dirs: list[Path], where: str) -> tuple[ModuleType, str]:
    if "." in name and "/" not in name:
        try:
            module = importlib.import_module(name)
        except ImportError as error:
            raise PluginLoadError(f"{where} cannot import module {name}: {error}") from None
        return module, getattr(module, "__file__", name) or name
    if not _NAME.match(name):
        raise PluginLoadError(f"{where} is not a valid plugin name")
    for folder in dirs:
        path = folder / f"{name}.py"
        if path.is_file():
            return _import_file(name, str(path), where), str(path)
    found = _entry_point(name, where)
    if found is not None:
        return found
    searched = ", ".join(str(d) for d in dirs)
    raise PluginLoadError(f"{where} unknown plugin {name!r} (looked in {searched}, "
                          f"and the {ENTRY_POINT_GROUP!r} entry points)")


def _entry_point(name: str, where: str) -> tuple[ModuleType, str] | None:
    """The module of the installed entry point ``name`` of ``qpgevent.plugins``, if any."""
    points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP, name=name)
    if not points:
        return None
    values = sorted({point.value for point in points})
    if len(values) > 1:  # two installed packages claim the name: say so rather than pick one
        raise PluginLoadError(f"{where} entry point {name} is ambiguous: {', '.join(values)}")
    point = next(iter(points))
    module_name = point.module
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # any import-time failure of a plugin is a load error
        raise PluginLoadError(f"{where} entry point {name} = {point.value} failed to import: "
                              f"{type(error).__name__}: {error}") from None
    return module, getattr(module, "__file__", module_name) or module_name


def _import_file(name: str, path: str, where: str) -> ModuleType:
    module_name = _MODULE_PREFIX + name.replace("/", ".")
    existing = sys.modules.get(module_name)
    if existing is not None and getattr(existing, "__file__", None) == path:
        return existing
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as error:  # any import-time failure of a plugin is a load error
        del sys.modules[module_name]
        raise PluginLoadError(f"{where} {path} failed to import: {type(error).__name__}: {error}") from None
    return module


def _plugin_class(module: ModuleType, path: str, where: str) -> type[Plugin]:
    classes = [obj for obj in vars(module).values()
               if inspect.isclass(obj) and issubclass(obj, Plugin) and obj is not Plugin
               and obj.__module__ == module.__name__]
    if len(classes) != 1:
        found = ", ".join(c.__name__ for c in classes) or "none"
        raise PluginLoadError(f"{where} {path} must define exactly one Plugin subclass (found {found})")
    return classes[0]


def _check_hook(cls: type[Plugin], hook: str, path: str, where: str) -> None:
    spec = HOOKS.get(hook)
    method = getattr(cls, "hook_" + hook)
    line = _line_of(method)
    if spec is None:
        known = ", ".join(sorted(HOOKS))
        raise PluginLoadError(f"{where} {path}{line}: hook_{hook}: no such hook (hooks are: {known})")
    expected = (["session"] if spec.session else []) + list(spec.args)
    try:
        inspect.signature(method).bind(None, *expected)
    except TypeError:
        wanted = ", ".join(["self", *expected])
        raise PluginLoadError(f"{where} {path}{line}: hook_{hook} must accept ({wanted})") from None


def _line_of(method: object) -> str:
    try:
        return f":{inspect.getsourcelines(method)[1]}"  # type: ignore[arg-type]
    except (OSError, TypeError):
        return ""


__all__ = ["load_plugins", "load_plugin", "forget_plugin_modules", "plugin_dirs", "bundled_plugin_dir"]
