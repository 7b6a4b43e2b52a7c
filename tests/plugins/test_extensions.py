"""The extension points, each shown by a small test plugin (tests/data/plugins), in memory.

The plugin harness drives the real conversation without a socket: these tests check the
``*_parse`` hooks, a SASL mechanism a plugin declares, the ``received_line`` and ``rset``
hooks, the explicit ``rewrite_sender`` (and the old ``(OK, path)`` form), the bundled
``etrn`` plugin (a verb end to end), and how AUTH back ends chain. The same extension
points over a socket: ``tests/e2e/test_extension_points.py``.
"""

from __future__ import annotations

import base64
import importlib.util
import logging
from pathlib import Path

import pytest

from qpgevent.core.errors import PluginLoadError
from qpgevent.engine.sasl import MAX_STEPS

DATA = Path(__file__).resolve().parent.parent / "data" / "plugins"
ACCEPT = "[[rcpt_ok]]\n  domains = example.test\n[[queue/discard]]\n"
#: AUTH in plaintext for these tests, answered at once after a failure.
AUTH_SETTINGS = {"tls_before_auth": "no", "auth_failure_delay": 0}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def make_hash(password: str) -> str:
    """A users-file entry, made by the bundled back end's own code (cheap scrypt: the tests
    are about the dialogue, not the hash)."""
    path = Path(__file__).resolve().parents[2] / "plugins" / "auth" / "flat_file.py"
    spec = importlib.util.spec_from_file_location("flat_file_for_tests", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_hash(password, (1 << 4, 1, 1))


# -- the *_parse hooks --------------------------------------------------------------------


def test_parse_hooks_rewrite_what_the_core_parses(plugin_harness):
    harness = plugin_harness(DATA / "parsers.py", after=ACCEPT)
    transcript = harness.run_session(["EHLO CLIENT.Example.TEST", "MAIL FROM <a@client.test>",
                                      "RCPT TO <bob@example.test>", "QUIT"])
    assert transcript.codes == [220, 250, 250, 250, 221]
    assert transcript.notes["seen_host"] == "client.example.test"  # the ehlo hook saw the mended host
    assert transcript.replies[2].text.startswith("2.1.0 <a@client.test>, sender OK")
    assert transcript.replies[3].text.startswith("2.1.5 <bob@example.test>, recipient ok")


def test_without_the_parse_hook_the_same_lines_are_syntax_errors(plugin_harness):
    harness = plugin_harness("rcpt_ok", domains="example.test")
    transcript = harness.run_session(["EHLO client.test", "MAIL FROM <a@client.test>"])
    assert transcript.codes == [220, 250, 501]


def test_a_parse_hook_refusal_is_a_syntax_error(plugin_harness):
    harness = plugin_harness(DATA / "parsers.py", after=ACCEPT)
    transcript = harness.run_session(["EHLO localhost", "HELO MX.Client.Test"])
    assert transcript.replies[1] == (501, "5.5.4 localhost is not your name")
    assert transcript.codes[2] == 250 and transcript.notes["seen_host"] == "mx.client.test"


def test_auth_parse_maps_an_old_mechanism_name(plugin_harness, tmp_path):
    users = tmp_path / "users.auth"
    users.write_text(f"alice@example.test:{make_hash('pw')}\n", encoding="utf-8")
    harness = plugin_harness(DATA / "parsers.py", after=f"[[auth/flat_file]]\n  users = {users}\n",
                             settings=AUTH_SETTINGS)
    blob = b64(b"\0alice@example.test\0pw")
    transcript = harness.run_session(["EHLO client.test", f"AUTH X-OLD-PLAIN {blob}"])
    assert transcript.codes == [220, 250, 235]
    assert transcript.notes["auth_user"] == "alice@example.test"


# -- a SASL mechanism from a plugin -------------------------------------------------------


def test_a_plugin_mechanism_is_offered_and_checked(plugin_harness):
    harness = plugin_harness(DATA / "x_token.py", settings=AUTH_SETTINGS)
    ok = harness.run_session(["EHLO client.test", f"AUTH X-TOKEN {b64(b'alice:s3cret')}"])
    assert "AUTH X-TOKEN" in ok.replies[1].text.split("\n")
    assert ok.replies[2] == (235, "2.7.0 Authentication successful")
    assert ok.notes["auth_user"] == "alice" and ok.notes["auth_method"] == "X-TOKEN"
    # Without an initial response: an empty 334, then the response.
    stepped = harness.run_session(["EHLO client.test", "AUTH X-TOKEN", b64(b"alice:s3cret")])
    assert stepped.codes == [220, 250, 334, 235]
    wrong = harness.run_session(["EHLO client.test", f"AUTH X-TOKEN {b64(b'alice:guess')}"])
    assert wrong.codes == [220, 250, 535] and "auth_user" not in wrong.notes


def test_a_plugin_mechanism_of_several_steps(plugin_harness):
    harness = plugin_harness(DATA / "x_challenge.py", settings=AUTH_SETTINGS)
    echo = b64(b"nonce:alice"[::-1])
    ok = harness.run_session(["EHLO client.test", f"AUTH X-ECHO {b64(b'alice')}", echo])
    assert ok.codes == [220, 250, 334, 235] and ok.replies[2].text == b64(b"nonce:alice")
    assert ok.notes["auth_user"] == "alice" and ok.notes["auth_method"] == "X-ECHO"
    # No initial response: the plugin speaks first (sasl_first_challenge), then as above.
    first = harness.run_session(["EHLO client.test", "AUTH X-ECHO", b64(b"alice"), echo])
    assert first.codes == [220, 250, 334, 334, 235] and first.replies[2].text == b64(b"who?")
    wrong = harness.run_session(["EHLO client.test", f"AUTH X-ECHO {b64(b'alice')}", b64(b"guess")])
    assert wrong.codes == [220, 250, 334, 535] and "auth_user" not in wrong.notes
    # "*" cancels (501); the next AUTH starts afresh.
    bob = harness.run_session(["EHLO client.test", f"AUTH X-ECHO {b64(b'alice')}", "*",
                               f"AUTH X-ECHO {b64(b'bob')}", b64(b"nonce:bob"[::-1])])
    assert bob.codes == [220, 250, 334, 501, 334, 235] and bob.notes["auth_user"] == "bob"


def test_a_plugin_that_challenges_for_ever_meets_the_step_limit(plugin_harness):
    harness = plugin_harness(DATA / "x_challenge.py", settings=AUTH_SETTINGS)
    endless = harness.run_session(["EHLO client.test", "AUTH X-NEVER", *[b64(b"x")] * MAX_STEPS])
    assert endless.codes == [220, 250, *[334] * MAX_STEPS, 535]


def test_a_plugin_may_take_over_cram_md5_not_plain(plugin_harness, tmp_path):
    for name, error in (("CRAM-MD5", None), ("PLAIN", "sasl_mechanisms: PLAIN is built in")):
        path = tmp_path / f"mech_{name[:4].lower()}.py"  # a file each: the loader caches modules by name
        path.write_text('"""mech: declares a mechanism."""\nfrom qpgevent.plugin import Plugin\n\n\n'
                        f'class Mech(Plugin):\n    sasl_mechanisms = ("{name}",)\n', encoding="utf-8")
        if error:
            with pytest.raises(PluginLoadError, match=error):
                plugin_harness(path)
        else:
            offered = plugin_harness(path, settings=AUTH_SETTINGS).run_session(["EHLO client.test"])
            assert "AUTH CRAM-MD5" in offered.replies[1].text.split("\n")


def test_a_bad_declaration_is_a_load_error(plugin_harness, tmp_path):
    bad = tmp_path / "bad_verbs.py"
    bad.write_text('"""bad_verbs: declares a core verb."""\nfrom qpgevent.plugin import Plugin\n\n\n'
                   'class BadVerbs(Plugin):\n    verbs = ("DATA",)\n', encoding="utf-8")
    with pytest.raises(PluginLoadError, match="verbs: DATA is the core's"):
        plugin_harness(bad)


# -- received_line, rset, rewriting a path ------------------------------------------------


def test_received_line_replaces_our_header_once(plugin_harness):
    harness = plugin_harness(DATA / "trace.py", after=ACCEPT)
    seen = []

    class Keep:
        def hook_started(self, hook, plugin, session):
            pass

        def hook_finished(self, hook, plugin, session, verdict, seconds):
            if hook == "queue":
                seen.append(bytes(b"".join(session.transaction.message_chunks())))

    harness.runner.observe(Keep())
    transcript = harness.run_session(["EHLO client.test", "MAIL FROM:<a@client.test>", "RCPT TO:<b@example.test>",
                                      "DATA", "Subject: hi\n\nbody\n"])
    assert transcript.codes[-1] == 250  # queue/discard took it
    message = seen[0]
    assert message.count(b"Received:") == 1
    assert message.startswith(b"Received: from hidden by mx.example.test; Thu, 1 Jan 2026")


def test_rset_hook_sees_every_rset_and_rset_still_answers_250(plugin_harness):
    harness = plugin_harness(DATA / "trace.py")
    transcript = harness.run_session(["EHLO client.test", "RSET", "RSET"])
    assert transcript.codes == [220, 250, 250, 250]
    assert transcript.notes["rsets"] == 2


def test_rewrite_sender_replaces_the_path(plugin_harness):
    harness = plugin_harness(DATA / "trace.py")
    transcript = harness.run_session(["EHLO client.test", "MAIL FROM:<old@legacy.test>"])
    assert transcript.replies[2].text.startswith("2.1.0 <new@example.test>, sender OK")


def test_the_old_ok_path_form_still_rewrites_and_says_it_is_deprecated(plugin_harness, caplog):
    harness = plugin_harness(DATA / "trace.py")
    with caplog.at_level(logging.WARNING, logger="qpgevent"):
        transcript = harness.run_session(["EHLO client.test", "MAIL FROM:<implicit@legacy.test>"])
    assert transcript.replies[2].text.startswith("2.1.0 <implicit@example.test>, sender OK")
    assert any("deprecated" in record.getMessage() and "rewrite_sender" in record.getMessage()
               for record in caplog.records)


def test_rewriting_at_the_wrong_hook_is_a_plugin_error(plugin_harness):
    harness = plugin_harness(DATA / "trace.py")
    transcript = harness.run_session(["EHLO client.test", "MAIL FROM:<wrong@legacy.test>"])
    assert transcript.replies[2] == (451, "4.3.0 Internal error, try again later")


# -- the bundled etrn plugin: a verb end to end -----------------------------------------------


def test_etrn_is_offered_and_refused_cleanly(plugin_harness):
    harness = plugin_harness("etrn")
    transcript = harness.run_session(["EHLO client.test", "ETRN example.org", "ETRN", "NOOP"])
    assert "ETRN" in transcript.replies[1].text.split("\n")
    assert transcript.replies[2] == (458, "4.3.0 Unable to queue messages for node example.org: "
                                          "this server keeps no queue")
    assert transcript.replies[3] == (501, "5.5.4 Syntax: ETRN [@|#]node")
    assert transcript.codes[4] == 250


def test_without_the_plugin_etrn_is_unknown(plugin_harness):
    harness = plugin_harness("rcpt_ok", domains="example.test")
    assert harness.run_session(["EHLO client.test", "ETRN example.org"]).codes == [220, 250, 500]


# -- AUTH back ends chain -----------------------------------------------------------------------


def test_auth_back_ends_chain_past_those_that_do_not_know_the_user(plugin_harness, tmp_path):
    # As docs/hooks.md says: a back end that does not know the user declines and the next
    # is asked; one that knows the user and refuses the password is final.
    first, second = tmp_path / "first.auth", tmp_path / "second.auth"
    first.write_text(f"alice@example.test:{make_hash('one')}\n", encoding="utf-8")
    second.write_text(f"alice@example.test:{make_hash('two')}\nbob@example.test:{make_hash('three')}\n",
                      encoding="utf-8")
    harness = plugin_harness("auth/flat_file", users=str(first),
                             after=f"[[auth/flat_file:2]]\n  users = {second}\n", settings=AUTH_SETTINGS)

    def auth(user: str, password: str):
        blob = b64(f"\0{user}\0{password}".encode())
        return harness.run_session(["EHLO client.test", f"AUTH PLAIN {blob}"], ip="192.0.2.50")

    assert auth("alice@example.test", "one").codes[-1] == 235  # the first says OK
    bob = auth("bob@example.test", "three")  # the first does not know bob: the second is asked
    assert bob.codes[-1] == 235 and [d.plugin for d in bob.decisions if d.hook == "auth"] == \
        ["auth/flat_file", "auth/flat_file:2"]
    alice = auth("alice@example.test", "two")  # the first knows alice: its refusal is final
    assert alice.codes[-1] == 535 and [d.plugin for d in alice.decisions if d.hook == "auth"] == ["auth/flat_file"]
    assert auth("carol@example.test", "x").codes[-1] == 535  # nobody knows carol


# -- no socket ----------------------------------------------------------------------------------


def test_the_harness_runs_the_conversation_without_a_socket(plugin_harness, monkeypatch):
    import socket

    def no_socket(*args, **kwargs):
        raise AssertionError("the harness opened a socket")

    harness = plugin_harness("rcpt_ok", domains="example.test", after="[[queue/discard]]\n")
    monkeypatch.setattr(socket, "socket", no_socket)
    monkeypatch.setattr(socket, "socketpair", no_socket)
    transcript = harness.run_session(["EHLO client.test", "MAIL FROM:<a@client.test>", "RCPT TO:<b@example.test>",
                                      "DATA", "Subject: hi\n\nbody\n", "QUIT"])
    assert transcript.codes == [220, 250, 250, 250, 354, 250, 221] and transcript.closed


def test_a_harness_session_can_answer_the_client(plugin_harness):
    # run_hook's session belongs to a conversation the harness keeps: respond() reaches it.
    harness = plugin_harness("rcpt_ok", domains="example.test")
    session = harness.session(helo="client.test")
    session.respond(250, "fine")
    assert session.status()["helo"] == "client.test"
