"""qpsmtpd's plugin names, loaded as the plugins that took their place, with a deprecation note.

Through the real config reader and loader: one case per kind of old name (Debian's
``check_*`` wrappers, the older long names, a dash where a module name has an
underscore, the auth back ends' ``auth_`` prefix). The plugin takes the current name (its
label, logs and results say ``earlytalker``), the instance suffix stays, the note names
both, and a file of the old name in the operator's plugin folder is theirs, not an alias.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from qpgevent import config
from qpgevent.core.errors import PluginLoadError
from qpgevent.engine.aliases import ALIASES
from qpgevent.engine.loader import bundled_plugin_dir, load_plugins

HEAD = ["[server]", "  me = mx.example.test", "  listen = 127.0.0.1:0"]


def load(tmp_path: Path, plugins: list[str], head: list[str] = HEAD):
    path = tmp_path / "qpsmtpd.ini"
    path.write_text("\n".join(head + ["[plugins]"] + plugins) + "\n", encoding="utf-8")
    return load_plugins(config.load(str(path)))


@pytest.mark.parametrize("old, new, options", [
    ("check_earlytalker", "earlytalker", ["    wait = 0.5"]),  # a Debian check_* wrapper
    ("check_spamhelo", "helo", ["    policy = rfc"]),
    ("require_resolvable_fromhost", "resolvable_fromhost", []),  # the older long name
    ("queue/smtp-forward", "queue/smtp_forward", ["    routes = *:127.0.0.1:2526"]),  # a dash
    ("queue/qmail-queue", "queue/qmail_queue", []),
    ("auth/auth_flat_file", "auth/flat_file", ["    users = users.auth"]),  # the auth_ prefix
])
def test_an_old_name_loads_the_current_plugin_with_a_deprecation_note(tmp_path, caplog, old, new, options):
    (tmp_path / "users.auth").write_text("", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="qpgevent.loader"):
        [plugin] = load(tmp_path, [f"  [[{old}]]", *options])
    assert plugin.name == new and plugin.written_as == old
    assert Path(plugin.path) == bundled_plugin_dir() / f"{new}.py"
    [note] = [record.getMessage() for record in caplog.records if record.name == "qpgevent.loader"]
    assert f"[[{old}]] is qpsmtpd's name of the {new} plugin: write [[{new}]]" in note and "deprecated" in note
    assert f"{tmp_path / 'qpsmtpd.ini'}:" in note  # which line of which file to change


def test_the_instance_suffix_stays_and_options_are_checked_as_the_plugin_s(tmp_path):
    plugins = load(tmp_path, ["  [[check_badmailfrom]]", "    list = @a.test", "  [[check_badmailfrom:2]]",
                              "    list = @b.test"])
    assert [p.name for p in plugins] == ["badmailfrom", "badmailfrom:2"]
    assert plugins[1].config["list"] == ["@b.test"]
    with pytest.raises(PluginLoadError, match=r"\[\[check_badmailfrom\]\] lsit: unknown option"):
        load(tmp_path, ["  [[check_badmailfrom]]", "    lsit = @a.test"])


def test_a_plugin_file_of_the_old_name_is_the_operator_s_own(tmp_path, caplog):
    own = tmp_path / "plugins"
    own.mkdir()
    (own / "check_relay.py").write_text('"""check_relay: the operator\'s own."""\nfrom qpgevent.plugin import '
                                        "Plugin\n\n\nclass Mine(Plugin):\n    pass\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="qpgevent.loader"):
        [plugin] = load(tmp_path, ["  [[check_relay]]"])
    assert plugin.name == "check_relay" and plugin.path == str(own / "check_relay.py")
    assert not [r for r in caplog.records if r.name == "qpgevent.loader"]


def test_every_alias_names_a_bundled_plugin():
    missing = sorted(new for new in ALIASES.values() if not (bundled_plugin_dir() / f"{new}.py").is_file())
    assert not missing
    assert not [old for old in ALIASES if (bundled_plugin_dir() / f"{old}.py").is_file()]
