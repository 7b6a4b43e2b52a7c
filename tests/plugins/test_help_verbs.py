"""HELP per verb, ETRN with and without its plugin, VRFY and EXPN through hooks: in memory.

The plugin harness drives the real conversation (no socket). HELP answers 214 with the
verbs the session supports, and ``HELP <verb>`` the verb's line (the core's table in
``qpgevent/core/help.py``, a plugin's ``help_texts``); a verb nobody knows is 504. The test
plugin ``tests/data/plugins/directory_lists.py`` answers VRFY and EXPN. The same over a
socket, with smtplib: ``tests/e2e/test_help_vrfy_expn_smtplib.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from qpgevent.core.errors import PluginLoadError

DATA = Path(__file__).resolve().parent.parent / "data" / "plugins"


def help_verbs(text: str) -> list[str]:
    """The verbs listed in a HELP reply (its lines between the first and the last)."""
    lines = text.split("\n")
    return " ".join(line.removeprefix("2.0.0 ") for line in lines[1:-1]).split()


def test_help_lists_the_core_verbs_and_help_verb_explains_one(plugin_harness):
    harness = plugin_harness("rcpt_ok", domains="example.test")
    transcript = harness.run_session(["EHLO client.test", "HELP", "HELP mail from", "HELP XYZZY", "NOOP"])
    code, text = transcript.replies[2]
    verbs = help_verbs(text)
    assert code == 214 and {"HELO", "EHLO", "MAIL", "RCPT", "DATA", "VRFY", "HELP", "QUIT"} <= set(verbs)
    assert "EXPN" not in verbs and "ETRN" not in verbs  # nobody answers them here
    assert transcript.replies[3][0] == 214 and transcript.replies[3][1].startswith("2.0.0 MAIL FROM:<sender>")
    assert transcript.replies[4] == (504, "5.5.1 HELP: no such command here")
    assert transcript.codes[5] == 250


def test_help_lists_and_explains_a_plugin_verb(plugin_harness):
    harness = plugin_harness(DATA / "directory_lists.py", after="[[etrn]]\n")
    transcript = harness.run_session(["EHLO client.test", "HELP", "HELP xlists", "HELP ETRN"])
    verbs = help_verbs(transcript.replies[2][1])
    assert {"XLISTS", "ETRN", "EXPN"} <= set(verbs)
    assert transcript.replies[3] == (214, "2.0.0 XLISTS: name the mailing lists EXPN knows")
    assert transcript.replies[4][0] == 214 and "RFC 1985" in transcript.replies[4][1]


def test_the_help_hook_still_answers_first(plugin_harness):
    harness = plugin_harness(DATA / "returns.py", hook="help", code="OK", message='see the web page')
    transcript = harness.run_session(["EHLO client.test", "HELP MAIL"])
    assert transcript.replies[2] == (214, "2.0.0 see the web page")


@pytest.mark.parametrize("texts, problem", [
    ('{"XNOPE": "not mine"}', "not one of this plugin's verbs"),
    ('{"XLISTS": "two\\nlines"}', "one line of printable ASCII"),
    ('("XLISTS",)', "must be a dict"),
])
def test_a_bad_help_text_is_a_load_error(plugin_harness, tmp_path, texts, problem):
    source = (DATA / "directory_lists.py").read_text(encoding="utf-8")
    bad = source.replace('help_texts = {"XLISTS": "XLISTS: name the mailing lists EXPN knows"}',
                         f"help_texts = {texts}")
    assert bad != source
    (tmp_path / "bad_help.py").write_text(bad, encoding="utf-8")
    with pytest.raises(PluginLoadError, match=problem):
        plugin_harness(tmp_path / "bad_help.py")


def test_etrn_without_its_plugin_is_an_unknown_command_and_with_it_458(plugin_harness):
    without = plugin_harness("rcpt_ok", domains="example.test")
    assert without.run_session(["EHLO client.test", "ETRN example.org"]).replies[2] == \
        (500, "5.5.1 Unrecognized command")  # RFC 5321 4.2.4: 500, as for any verb we do not know
    with_it = plugin_harness("etrn")
    assert with_it.run_session(["EHLO client.test", "ETRN example.org"]).codes[2] == 458


def test_vrfy_defaults_to_252_and_a_plugin_may_verify_or_deny(plugin_harness):
    bare = plugin_harness("rcpt_ok", domains="example.test")
    assert bare.run_session(["EHLO client.test", "VRFY bob"]).replies[2] == \
        (252, "2.5.0 Just try sending a mail and we'll see how it turns out ...")
    harness = plugin_harness(DATA / "directory_lists.py")
    transcript = harness.run_session(["EHLO client.test", "VRFY bob", "VRFY nobody", "VRFY carol"])
    assert transcript.replies[2] == (250, "2.1.5 Bob Example <bob@example.test>")
    assert transcript.replies[3] == (550, "5.1.1 No such user here")
    assert transcript.codes[4] == 252


def test_expn_is_not_implemented_without_a_plugin(plugin_harness):
    harness = plugin_harness("rcpt_ok", domains="example.test")
    transcript = harness.run_session(["EHLO client.test", "EXPN staff", "EXPN", "NOOP"])
    assert transcript.replies[2] == (502, "5.5.1 EXPN not supported")
    assert transcript.codes[3:] == [501, 250]


def test_expn_through_the_hook_lists_the_members(plugin_harness):
    harness = plugin_harness(DATA / "directory_lists.py")
    transcript = harness.run_session(["EHLO client.test", "EXPN staff", "EXPN nobody", "EXPN other"])
    assert transcript.replies[2] == (250, "2.1.5 Alice Example <alice@example.test>\n"
                                          "2.1.5 Bob Example <bob@example.test>")
    assert transcript.replies[3] == (550, "5.1.1 No such list")
    assert transcript.replies[4][0] == 502


def test_a_plugin_cannot_declare_expn_as_its_own_verb(plugin_harness, tmp_path):
    source = (DATA / "directory_lists.py").read_text(encoding="utf-8")
    (tmp_path / "expn_verb.py").write_text(source.replace('verbs = ("XLISTS",)', 'verbs = ("EXPN",)'),
                                           encoding="utf-8")
    with pytest.raises(PluginLoadError, match="EXPN is the core's"):
        plugin_harness(tmp_path / "expn_verb.py")
