"""The docs say what the code does: generated pages current, plugin docstrings complete,
their examples valid config, and the authoring guide's worked example passing its tests."""

from __future__ import annotations

import importlib.util
import inspect
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from configobj import ConfigObj

from qpgevent.config import PluginSpec, validate_options
from qpgevent.plugin import STANDARD_CONFIGSPEC, Plugin

ROOT = Path(__file__).resolve().parents[2]
PLUGINS = sorted((ROOT / "plugins").rglob("*.py"))
GUIDE = ROOT / "docs" / "writing-plugins.md"


def test_generated_reference_pages_are_current():
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "gen_docs.py"), "--check"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr + "\n(run tools/gen_docs.py and commit docs/)"


def test_the_hook_reference_has_every_hook_and_its_exact_replies():
    page = (ROOT / "docs" / "hooks.md").read_text(encoding="utf-8")
    from qpgevent.engine.hooks import HOOKS

    assert all(f"\n## {name}\n" in page for name in HOOKS)
    assert "| `DENYSOFT_DISCONNECT` | connection closed after the reply | `421 4.7.1 Your HELO was refused, " \
           "try again later` |" in page


def load_plugin(path: Path) -> tuple[type[Plugin], str]:
    """The plugin class of ``path`` and its module's docstring."""
    name = "qpgevent_doc_test." + path.relative_to(ROOT / "plugins").with_suffix("").as_posix().replace("/", ".")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    [cls] = [obj for obj in vars(module).values() if inspect.isclass(obj) and issubclass(obj, Plugin)
             and obj is not Plugin and obj.__module__ == module.__name__]
    return cls, inspect.getdoc(module) or ""


def plugin_id(path: Path) -> str:
    return path.relative_to(ROOT / "plugins").with_suffix("").as_posix()


@pytest.mark.parametrize("path", PLUGINS, ids=plugin_id)
def test_every_bundled_plugin_documents_what_options_notes_and_an_example(path):
    name = plugin_id(path)
    cls, doc = load_plugin(path)
    assert doc.startswith(f"{name}: "), f"{name}: the docstring starts with '{name}: what it does'"
    own = [line.split("=", 1)[0].strip() for line in cls.configspec_lines()[len(STANDARD_CONFIGSPEC):]
           if not line.strip().startswith("[")]  # a sub-section header, not an option
    if own:
        assert "Options" in doc, f"{name}: no Options part"
        missing = [key for key in own if not re.search(rf"\b{re.escape(key)}\b", doc)]
        assert not missing, f"{name}: options not documented: {missing}"
    source = path.read_text(encoding="utf-8").split('"""', 2)[-1]
    if "notes" in source:
        assert "note" in doc.lower(), f"{name}: uses notes but does not say which"
    assert "Example::" in doc, f"{name}: no Example"


@pytest.mark.parametrize("path", PLUGINS, ids=plugin_id)
def test_every_plugin_example_is_valid_config(path, tmp_path):
    name = plugin_id(path)
    cls, doc = load_plugin(path)
    example = textwrap.dedent(doc.split("Example::", 1)[1].split("\n\n", 2)[1])
    if "[plugins]" not in example:
        example = "[plugins]\n" + example
    config = ConfigObj(example.splitlines(), interpolation=False)
    labels = [label for label in config["plugins"] if label.split(":", 1)[0] == name]
    assert labels, f"{name}: the example has no [[{name}]] section"
    for label in labels:
        spec = PluginSpec(label, config["plugins"][label].dict(), "example", None)
        validate_options(spec, cls.configspec_lines(), str(tmp_path))


def guide_blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", GUIDE.read_text(encoding="utf-8"), re.DOTALL)


def test_the_authoring_guide_example_passes_its_own_tests(tmp_path, plugin_harness, monkeypatch):
    plugin = next(block for block in guide_blocks("python") if "class NoHotSauce" in block)
    tests = next(block for block in guide_blocks("python") if "def test_" in block)
    (tmp_path / "site_plugins").mkdir()
    (tmp_path / "site_plugins" / "no_hot_sauce.py").write_text(plugin, encoding="utf-8")
    monkeypatch.chdir(tmp_path)  # the guide's tests name the plugin "site_plugins/no_hot_sauce.py"
    namespace = {"__name__": "guide_tests"}
    exec(compile(tests, str(GUIDE), "exec"), namespace)  # noqa: S102 - the guide's own test code
    names = [name for name in namespace if name.startswith("test_")]
    assert len(names) == 3
    for name in names:
        namespace[name](plugin_harness)


def test_the_authoring_guide_ini_is_valid(tmp_path):
    plugin = next(block for block in guide_blocks("python") if "class NoHotSauce" in block)
    (tmp_path / "site_plugins").mkdir()
    (tmp_path / "site_plugins" / "no_hot_sauce.py").write_text(plugin, encoding="utf-8")
    ini = next(block for block in guide_blocks("ini") if "[[no_hot_sauce]]" in block)
    (tmp_path / "qpsmtpd.ini").write_text(ini.replace("[server]\n", "[server]\n  me = mx.example.test\n"),
                                          encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "qpgevent", "-c", str(tmp_path / "qpsmtpd.ini"),
                             "--check-config"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "data_headers_end: no_hot_sauce" in result.stdout


def test_the_migration_guide_names_every_bundled_plugin():
    guide = (ROOT / "docs" / "migrating.md").read_text(encoding="utf-8")
    missing = [plugin_id(path) for path in PLUGINS if f"`{plugin_id(path)}`" not in guide]
    assert not missing, f"docs/migrating.md does not say what these replace: {missing}"
