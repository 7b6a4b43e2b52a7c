"""Config and plugin loading errors: one ConfigError naming the file, the line and the key.

Each case writes a small qpsmtpd.ini, runs the real reader (``config.load``) and the
real loader (``loader.load_plugins``), and checks the error text: the ini path, the line
the operator has to fix (found in the text written, not typed in), and the key or plugin
name. Plugins that are broken on purpose live in ``tests/data/plugins``. The same cases
through the command line are in ``tests/e2e/test_config_cli.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qpgevent import config
from qpgevent.core.errors import ConfigError, PluginLoadError
from qpgevent.engine.loader import load_plugins
from qpgevent.plugin import Plugin

PLUGIN_DIR = Path(__file__).resolve().parent.parent / "data" / "plugins"
HEAD = ["[server]", "  me = mx.example.test", "  listen = 127.0.0.1:0", f"  plugin_dirs = {PLUGIN_DIR}"]


def write(directory: Path, lines: list[str]) -> Path:
    path = directory / "qpsmtpd.ini"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def line_of(lines: list[str], text: str) -> int:
    """The 1-based number of the first line that contains ``text``."""
    return next(i for i, line in enumerate(lines, 1) if text in line)


def def_line(plugin: str, text: str) -> int:
    return line_of((PLUGIN_DIR / f"{plugin}.py").read_text().splitlines(), text)


def load_all(path: Path):
    settings = config.load(str(path))
    return settings, load_plugins(settings)


#: id -> (ini lines, the text of the line the error must point at, words it must contain). The
#: text is the line's own (``key = value``), not a word the checkout's path could hold too.
CASES = {
    "unknown plugin": (
        HEAD + ["[plugins]", "  [[rcpt_ok]]", "  [[no_such_plugin]]"],
        "[[no_such_plugin]]", ["no_such_plugin", "unknown plugin", str(PLUGIN_DIR)]),
    "plugin fails to import": (
        HEAD + ["[plugins]", "  [[broken_import]]"],
        "[[broken_import]]", ["broken_import", str(PLUGIN_DIR / "broken_import.py"), "failed to import",
                              "qpgevent_no_such_module_anywhere"]),
    "two Plugin classes": (
        HEAD + ["[plugins]", "  [[two_classes]]"],
        "[[two_classes]]", ["two_classes", str(PLUGIN_DIR / "two_classes.py"), "exactly one", "First, Second"]),
    "unknown hook": (
        HEAD + ["[plugins]", "  [[rcpt_ok]]", "  [[hook_typo]]"],
        "[[hook_typo]]", ["hook_mial", "no such hook",
                          f"{PLUGIN_DIR / 'hook_typo.py'}:{def_line('hook_typo', 'def hook_mial')}"]),
    "wrong hook signature": (
        HEAD + ["[plugins]", "  [[bad_signature]]"],
        "[[bad_signature]]", ["hook_mail must accept (self, session, sender, params)",
                              f"{PLUGIN_DIR / 'bad_signature.py'}:{def_line('bad_signature', 'def hook_mail')}"]),
    "bad option type": (
        HEAD + ["[plugins]", "  [[queue/maildir]]", "    path = Maildir", "    fsync = maybe"],
        "fsync = maybe", ["[[queue/maildir]]", "fsync", "maybe"]),
    "bad standard option type": (
        HEAD + ["[plugins]", "  [[rcpt_ok]]", "    domains = example.test", "    timeout = soon"],
        "timeout = soon", ["[[rcpt_ok]]", "timeout", "soon"]),
    "unknown option": (
        HEAD + ["[plugins]", "  [[rcpt_ok]]", "    domains = example.test", "    domian = other.test"],
        "domian = other.test", ["[[rcpt_ok]]", "domian", "unknown option"]),
    "unknown option in a second instance": (
        HEAD + ["[plugins]", "  [[rcpt_ok]]", "    domains = a.test",
                "  [[rcpt_ok:2]]", "    domains = b.test", "    domian = c.test"],
        "domian = c.test", ["[[rcpt_ok:2]]", "domian", "unknown option"]),
    "missing required option": (
        HEAD + ["[plugins]", "  [[rcpt_ok]]", "  [[returns]]", "    hook = mail"],
        "[[returns]]", ["[[returns]]", "code", "missing"]),
    "unknown key in limits": (
        HEAD + ["[limits]", "  max_connections = 10", "  max_conections = 5", "[plugins]"],
        "max_conections", ["[limits]", "max_conections", "unknown key"]),
    "wrong type in server": (
        HEAD + ["  size_threshold = big", "[plugins]"],
        "size_threshold = big", ["[server]", "size_threshold", "big"]),
    "value out of range": (
        HEAD + ["[limits]", "  max_command_line = 100", "[plugins]"],
        "max_command_line", ["[limits]", "max_command_line", "too small"]),
    "bad listen": (
        ["[server]", "  me = mx.example.test", "  listen = nowhere", "[plugins]"],
        "listen = nowhere", ["[server]", "listen", "nowhere"]),
    "unknown section": (
        HEAD + ["[limts]", "  max_connections = 10", "[plugins]"],
        "[limts]", ["limts", "unknown section"]),
    "configobj syntax error": (
        HEAD + ["[limits", "  max_connections = 10", "[plugins]"],
        "[limits", ["[limits"]),
    "duplicate key": (
        HEAD + ["  me = again.example.test", "[plugins]"],
        "again.example.test", ["Duplicate keyword"]),
    "plugins scalar instead of section": (
        HEAD + ["[plugins]", "  rcpt_ok = yes", "  [[queue/maildir]]", "    path = Maildir"],
        "rcpt_ok = yes", ["[plugins] rcpt_ok", "[[rcpt_ok]]"]),
    "plugin setup fails": (
        HEAD + ["[plugins]", "  [[rcpt_ok]]", "    rcpthosts = no-such-file"],
        "[[rcpt_ok]]", ["[[rcpt_ok]]", "setup failed", "no-such-file"]),
}
PLUGIN_CASES = {"unknown plugin", "plugin fails to import", "two Plugin classes", "unknown hook",
                "wrong hook signature", "bad option type", "bad standard option type", "unknown option",
                "unknown option in a second instance", "missing required option", "plugin setup fails"}


@pytest.mark.parametrize("case", list(CASES))
def test_error_names_file_line_and_key(tmp_path: Path, case: str) -> None:
    lines, at, words = CASES[case]
    path = write(tmp_path, lines)
    with pytest.raises(ConfigError) as info:
        load_all(path)
    text = str(info.value)
    assert text.startswith(f"{path}:{line_of(lines, at)}: "), text
    for word in words:
        assert word in text, (word, text)
    assert "\n" not in text
    assert isinstance(info.value, PluginLoadError) == (case in PLUGIN_CASES)


def test_the_config_is_read_before_any_plugin_loads(tmp_path: Path) -> None:
    # Both a config error and a plugin error: the config error is reported (first things first).
    lines = HEAD + ["  size_threshold = big", "[plugins]", "  [[no_such_plugin]]"]
    with pytest.raises(ConfigError) as info:
        load_all(write(tmp_path, lines))
    assert "size_threshold" in str(info.value) and "no_such_plugin" not in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.ini"
    with pytest.raises(ConfigError) as info:
        config.load(str(missing))
    assert str(info.value).startswith(f"{missing}: cannot read")


# --- what loads ----------------------------------------------------------------------


def test_plugins_load_in_config_order_with_their_labels(tmp_path: Path) -> None:
    lines = HEAD + ["[plugins]", "  [[queue/discard]]", "  [[rcpt_ok:2]]", "    domains = b.test",
                    "  [[rcpt_ok]]", "    domains = a.test", "  [[recorder]]"]
    _, plugins = load_all(write(tmp_path, lines))
    assert [p.name for p in plugins] == ["queue/discard", "rcpt_ok:2", "rcpt_ok", "recorder"]
    assert all(isinstance(p, Plugin) for p in plugins)
    assert plugins[1].config["domains"] == ["b.test"] and plugins[2].config["domains"] == ["a.test"]
    assert type(plugins[1]) is type(plugins[2])
    assert plugins[3].path == str(PLUGIN_DIR / "recorder.py")


def test_options_are_typed_and_defaults_filled(tmp_path: Path) -> None:
    lines = HEAD + ["[plugins]", "  [[returns]]", "    hook = mail", "    code = DENY",
                    "    times = 3", "    timeout = 1.5", "  [[badmailfrom]]", "    reject = 0"]
    _, (plugin, refusing) = load_all(write(tmp_path, lines))
    assert plugin.config["times"] == 3 and plugin.config["sleep"] == 10.0
    assert plugin.config["message"] == [] and plugin.config["close"] is False
    assert plugin.timeout == 1.5 and plugin.config["loglevel"] is None
    assert "reject" not in plugin.config  # returns refuses nothing on its own: no reject options
    assert refusing.config["reject"] == "0" and refusing.config["reject_type"] == "perm"


def test_relative_paths_resolve_against_the_ini_folder(tmp_path: Path, monkeypatch) -> None:
    conf = tmp_path / "conf"
    (conf / "local-plugins").mkdir(parents=True)
    (conf / "rcpthosts").write_text("listed.test\n")
    (conf / "local-plugins" / "local_one.py").write_text(
        '"""local_one: a plugin found through a relative plugin_dirs."""\n'
        "from qpgevent.plugin import Plugin\n\n\nclass LocalOne(Plugin):\n    pass\n")
    lines = ["[server]", "  me = mx.example.test", "  spool_dir = spool/tmp", "  plugin_dirs = local-plugins",
             "[logging]", "  file = log/qpgevent.log",
             "[plugins]", "  [[local_one]]", "  [[rcpt_ok]]", "    rcpthosts = rcpthosts",
             "  [[queue/maildir]]", "    path = ../mail/Maildir"]
    path = write(conf, lines)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    settings, plugins = load_all(Path(os.path.relpath(path)))
    assert settings.path == str(path) and settings.base_dir == str(conf)
    assert settings.spool_dir == str(conf / "spool" / "tmp")
    assert settings.plugin_dirs == (str(conf / "local-plugins"),)
    assert settings.log_file == str(conf / "log" / "qpgevent.log")
    assert plugins[0].path == str(conf / "local-plugins" / "local_one.py")
    assert plugins[1].config["rcpthosts"] == str(conf / "rcpthosts")
    assert plugins[1].is_local("listed.test", "mx.example.test")
    assert plugins[2].config["path"] == str(tmp_path / "mail" / "Maildir")
    assert list(elsewhere.iterdir()) == []


def test_listen_override_replaces_the_ini_listen(tmp_path: Path) -> None:
    path = write(tmp_path, ["[server]", "  listen = 192.0.2.1:25, [2001:db8::1]:25", "[plugins]"])
    assert [str(x) for x in config.load(str(path)).listen] == ["192.0.2.1:25", "[2001:db8::1]:25"]
    settings = config.load(str(path), listen_override=["127.0.0.1:0", "[::1]:2525", ":26"])
    assert [str(x) for x in settings.listen] == ["127.0.0.1:0", "[::1]:2525", "0.0.0.0:26"]


def test_the_shipped_config_loads() -> None:
    shipped = Path(__file__).resolve().parents[2] / "qpsmtpd.ini"
    settings = config.load(str(shipped))
    assert [spec.label for spec in settings.plugins] == [
        line.strip()[2:-2] for line in shipped.read_text().splitlines() if line.strip().startswith("[[")]
    assert settings.spool_dir == str(shipped.parent / "spool" / "tmp")


def test_reject_declarations_are_checked_and_the_configspec_composed_not_edited(tmp_path: Path) -> None:
    class Temporary(Plugin):
        reject_options = ("reject", "reject_type")
        default_reject_type = "temp"
        configspec = "words = force_list(default=list())"

    class Redeclares(Plugin):
        reject_options = ("reject",)
        configspec = 'reject = option("0", "1", default="0")'  # a standard key declared again

    lines = Temporary.configspec_lines()
    assert [line.split(" = ")[0] for line in lines] == ["loglevel", "timeout", "reject", "reject_type", "words"]
    assert lines[3].endswith('default="temp")')
    assert Redeclares.configspec_lines()[2] == 'reject = option("0", "1", default="0")'
    assert Redeclares.unused_options({"reject": "1", "reject_type": "temp"}) == ["reject_type"]

    class Misspelt(Plugin):
        reject_options = ("rejekt",)

    class WrongType(Plugin):
        reject_options = ("reject_type",)
        default_reject_type = "later"

    with pytest.raises(ConfigError, match="reject_options"):
        Misspelt.configspec_lines()
    with pytest.raises(ConfigError, match="default_reject_type 'later'"):
        WrongType.configspec_lines()
