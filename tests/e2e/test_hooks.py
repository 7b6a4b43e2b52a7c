"""Every hook that answers, through the real server: what the client gets, and whether it stays.

A test plugin (``tests/data/plugins/returns.py``) answers one configured hook with one
return code; a raw socket client drives the session up to that hook and reads the
reply byte for byte. The expected bytes of the sweep come from the one reply table (whose
own properties ``tests/unit/test_reply_table.py`` checks), so these tests check that the
session sends exactly what the table says, and closes exactly when it says so; the
named tests below spell a few replies out literally. ``recorder.py`` writes down the
notification hooks (deny, ok, reset_transaction, disconnect, post_connection).
"""

from __future__ import annotations

import base64
import logging
import smtplib
import socket
import sys
import time
from pathlib import Path

import pytest

from qpgevent.codes import ReturnCode, Verdict
from qpgevent.core.reply import REPLY_TABLE, answer

PLUGIN_DIR = str(Path(__file__).resolve().parent.parent / "data" / "plugins")
ME = "mx.example.test"
INTERNAL = b"451 4.3.0 Internal error, try again later\r\n"
INTERNAL_CLOSE = b"421 4.3.0 Internal error, try again later\r\n"
MESSAGE = b"Subject: hooks\r\nFrom: a@client.test\r\n\r\nbody\r\n.\r\n"
MESSAGE_HOOKS = ("data_headers_end", "received_line", "data_post", "queue_pre", "queue")
#: The *_parse hooks, by the hook of the command they parse.
PARSE_HOOKS = {"helo_parse": "helo", "ehlo_parse": "ehlo", "mail_parse": "mail", "rcpt_parse": "rcpt",
               "auth_parse": "auth"}

def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


PLAIN = "\0bob@example.test\0pw"

#: What the client says before the command that fires each hook (after the greeting).
PRELUDE = {
    "pre_connection": [], "connect": [], "helo": [], "ehlo": [],
    "mail_pre": ["EHLO client.test"], "mail": ["EHLO client.test"],
    "rcpt_pre": ["EHLO client.test", "MAIL FROM:<a@client.test>"],
    "rcpt": ["EHLO client.test", "MAIL FROM:<a@client.test>"],
    "data": ["EHLO client.test", "MAIL FROM:<a@client.test>", "RCPT TO:<bob@example.test>"],
    **{hook: ["EHLO client.test", "MAIL FROM:<a@client.test>", "RCPT TO:<bob@example.test>", "DATA"]
       for hook in MESSAGE_HOOKS},
    "vrfy": ["EHLO client.test"], "expn": ["EHLO client.test"], "noop": ["EHLO client.test"], "help": ["EHLO client.test"],
    "quit": ["EHLO client.test"], "unrecognized_command": ["EHLO client.test"],
    # AUTH (offered in plaintext here: tls_before_auth = no): the hook fires on the last line.
    "auth": ["EHLO client.test"], "auth_plain": ["EHLO client.test"],
    "auth_login": ["EHLO client.test", "AUTH LOGIN", _b64("bob@example.test")],
    "auth_cram_md5": ["EHLO client.test", "AUTH CRAM-MD5"],
    # Extensions a plugin declared (returns.py: the verb XTEST, the SASL mechanism X-TEST).
    "command": ["EHLO client.test"], "auth_sasl": ["EHLO client.test"],
}
PRELUDE.update({parse: PRELUDE[hook] for parse, hook in PARSE_HOOKS.items()})
#: The command that fires the hook (None: the connection itself).
TRIGGER: dict[str, bytes | None] = {
    "pre_connection": None, "connect": None,
    "helo": b"HELO client.test\r\n", "ehlo": b"EHLO client.test\r\n",
    "mail_pre": b"MAIL FROM:<a@client.test>\r\n", "mail": b"MAIL FROM:<a@client.test>\r\n",
    "rcpt_pre": b"RCPT TO:<bob@example.test>\r\n", "rcpt": b"RCPT TO:<bob@example.test>\r\n",
    "data": b"DATA\r\n", **{hook: MESSAGE for hook in MESSAGE_HOOKS},
    "vrfy": b"VRFY bob\r\n", "expn": b"EXPN staff\r\n", "noop": b"NOOP\r\n", "help": b"HELP\r\n", "quit": b"QUIT\r\n",
    "unrecognized_command": b"FOO bar\r\n",
    "auth": f"AUTH PLAIN {_b64(PLAIN)}\r\n".encode(), "auth_plain": f"AUTH PLAIN {_b64(PLAIN)}\r\n".encode(),
    "auth_login": f"{_b64('pw')}\r\n".encode(), "auth_cram_md5": f"{_b64('bob ' + '0' * 32)}\r\n".encode(),
    "command": b"XTEST hello\r\n", "auth_sasl": f"AUTH X-TEST {_b64('token')}\r\n".encode(),
}
TRIGGER.update({parse: TRIGGER[hook] for parse, hook in PARSE_HOOKS.items()})
#: The reply code of the command when the hook passes silently.
SILENT_PASS = {"pre_connection": b"220 ", "connect": b"220 ", "helo": b"250 ", "ehlo": b"250-",
               "mail_pre": b"250 2.1.0 <a@client.test>", "rcpt_pre": b"250 2.1.5 <bob@example.test>",
               **{hook: b"250 2.0.0 Queued for the test" for hook in MESSAGE_HOOKS},
               "helo_parse": b"250 ", "ehlo_parse": b"250-", "mail_parse": b"250 2.1.0 <a@client.test>",
               "rcpt_parse": b"250 2.1.5 <bob@example.test>", "auth_parse": b"535 ",
               "help": b"214-2.0.0 Commands supported:\r\n"}  # the core's HELP (core/help.py)
DECIDING = [code for code in ReturnCode if code is not ReturnCode.DONE]
assert set(PRELUDE) == set(TRIGGER) == set(REPLY_TABLE), "a hook that answers is not swept"


class Client:
    """A raw SMTP client: send lines, read whole replies as bytes, see the server close."""

    def __init__(self, server, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection((server.host, server.port), timeout=timeout)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def command(self, line: str | bytes) -> bytes:
        self.send(line.encode() + b"\r\n" if isinstance(line, str) else line)
        return self.reply()

    def reply(self) -> bytes:
        """One whole reply, every line of it (``250-...`` up to ``250 ...``)."""
        out = b""
        while True:
            while b"\r\n" not in self.buffer:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError(f"server closed; had {out + self.buffer!r}")
                self.buffer += chunk
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            out += line + b"\r\n"
            if line[3:4] != b"-":
                return out

    def closed(self) -> bool:
        """Whether the server has closed (nothing more comes); False if it still talks."""
        if self.buffer:
            return False
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def plugins_module():
    """The test plugin modules as the loader imported them (``qpgevent_plugins.<name>``)."""

    def get(name: str):
        return sys.modules["qpgevent_plugins." + name]

    return get


@pytest.fixture
def start(make_server, plugins_module):
    """``start(plugins_ini, **settings)``: the real server with the test plugins, records cleared."""

    def run(plugins: str, **settings):
        settings.setdefault("tls_before_auth", "no")  # the AUTH hooks are swept in plaintext
        settings.setdefault("auth_failure_delay", 0)
        server = make_server(plugins, plugin_dirs=PLUGIN_DIR, **settings)
        for name, attr in (("returns", "CALLS"), ("recorder", "EVENTS")):
            if "qpgevent_plugins." + name in sys.modules:
                getattr(plugins_module(name), attr).clear()
        return server

    return run


@pytest.fixture
def hook_log():
    """Records of the ``qpgevent`` loggers during the test (the hook runner logs there)."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(logging.INFO)
    logger = logging.getLogger("qpgevent")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def returns(hook: str, code: str, label: str = "returns", **options: str) -> str:
    """The ini text of one ``returns`` instance."""
    lines = [f"[[{label}]]", f"  hook = {hook}", f"  code = {code}"]
    lines += [f"  {key} = {value}" for key, value in options.items()]
    return "\n".join(lines) + "\n"


def background(hook_under_test: str) -> str:
    """Plugins that accept the recipient and queue the message, unless that is the test."""
    text = ""
    if hook_under_test != "rcpt":
        text += returns("rcpt", "OK", "returns:accept")
    if hook_under_test != "queue":
        text += returns("queue", "OK", "returns:queue", message='"Queued for the test"')
    return text


def drive(server, hook: str) -> tuple[Client, bytes]:
    """Open a session and go up to ``hook``; return the client and the hook's reply."""
    client = Client(server)
    if TRIGGER[hook] is None:
        return client, client.reply()
    greeting = client.reply()
    assert greeting.startswith(b"220 "), greeting
    for line in PRELUDE[hook]:
        response = client.command(line)
        assert response[:1] in (b"2", b"3"), (line, response)
    return client, client.command(TRIGGER[hook])


# --- the sweep: every hook that answers x every deciding code ---------------------


SWEEP = [(hook, code, with_message) for hook in REPLY_TABLE for code in DECIDING
         for with_message in (False, True)
         # OK with words at a *_pre hook rewrites the path: test_pre_hook_rewrites_the_path; at a
         # *_parse hook it rewrites the argument (tests/plugins/test_extensions.py)
         if not (with_message and code is ReturnCode.OK and hook in ("mail_pre", "rcpt_pre", *PARSE_HOOKS))
         # OK at auth_sasl names the user and the words are ours: tests/plugins/test_extensions.py
         and not (hook == "auth_sasl" and code is ReturnCode.OK)]


@pytest.mark.parametrize("hook,code,with_message", SWEEP,
                         ids=[f"{h}-{c.name}-{'message' if m else 'default'}" for h, c, m in SWEEP])
def test_hook_answers_as_the_table_says(start, hook: str, code: ReturnCode, with_message: bool) -> None:
    words = ("words from the test plugin",) if with_message else ()
    options = {"message": f'"{words[0]}"'} if words else {}
    server = start(returns(hook, code.name, **options) + background(hook))
    client, got = drive(server, hook)
    # A plugin that declines has no say, words included: the chain's verdict is a bare DECLINED.
    decided = () if code is ReturnCode.DECLINED else words
    expected = answer(hook, Verdict(code, decided, "returns"), me=ME,
                      address="<a@client.test>" if hook == "mail" else "<bob@example.test>")
    if expected.reply is None:
        assert got.startswith(SILENT_PASS[hook]), got
        closes = False
    else:
        assert got == expected.reply.to_bytes(), got
        closes = expected.reply.close
        if words:
            assert (words[0].encode() in got) == bool(decided)
    if got.startswith(b"354 "):
        assert client.command(MESSAGE) == b"250 2.0.0 Queued for the test\r\n"
    if closes:
        assert client.closed(), "the server should have closed the connection"
    else:
        assert client.command("RSET") == b"250 2.0.0 OK\r\n"
        assert client.command("QUIT").startswith(b"221 ")
        assert client.closed()
    client.close()


def test_pre_hook_rewrites_the_path(start) -> None:
    server = start(returns("mail_pre", "OK", message="<rewritten@client.test>") + background("mail_pre"))
    client, got = drive(server, "mail_pre")
    assert got.startswith(b"250 2.1.0 <rewritten@client.test>, sender OK"), got
    client.close()


# --- the same cells, spelled out ---------------------------------------------------


@pytest.mark.parametrize("hook,code,message,expected,closes", [
    ("connect", "DENY", None, b"554 5.7.1 Connection from you denied, bye bye.\r\n", True),
    ("connect", "DENYSOFT", "busy", b"421 4.7.0 busy\r\n", True),
    ("helo", "DENY", None, b"550 5.7.1 Your HELO was refused\r\n", False),
    ("ehlo", "DENYSOFT_DISCONNECT", None, b"421 4.7.1 Your EHLO was refused, try again later\r\n", True),
    ("mail", "DENYSOFT", '"try later"', b"450 4.7.1 try later\r\n", False),
    ("mail", "DENYSOFT_DISCONNECT", None, b"421 4.7.1 <a@client.test>, temporarily denied\r\n", True),
    ("rcpt", "DENY", '"5.1.1 no such user"', b"550 5.1.1 no such user\r\n", False),
    # an enhanced code of the other failure class is taken, its class made to agree
    ("rcpt", "DENYSOFT", '"5.1.1 wrong class"', b"450 4.1.1 wrong class\r\n", False),
    ("rcpt", "DECLINED", None, b"450 4.7.1 No plugin decided if relaying is allowed\r\n", False),
    ("rcpt", "DENY_DISCONNECT", None, b"550 5.7.1 delivery denied\r\n", True),
    ("data", "DENY", None, b"554 5.7.1 Message denied\r\n", False),
    ("data", "OK", None, b"354 go ahead\r\n", None),
    ("data_headers_end", "DENYSOFT", None, b"451 4.7.1 Message denied temporarily\r\n", False),
    ("data_post", "DENY", "one, two", b"554-5.7.1 one\r\n554 5.7.1 two\r\n", False),
    ("queue_pre", "DENYSOFT_DISCONNECT", None, b"421 4.7.1 Message denied temporarily\r\n", True),
    ("queue", "OK", '"Queued as 12345"', b"250 2.0.0 Queued as 12345\r\n", False),
    ("queue", "DENY", None, b"554 5.0.0 Message denied\r\n", False),
    ("vrfy", "OK", None, b"250 2.1.5 User OK\r\n", False),
    ("vrfy", "DECLINED", None, b"252 2.5.0 Just try sending a mail and we'll see how it turns out ...\r\n", False),
    ("noop", "DENY_DISCONNECT", None, b"500 5.5.1 Stop wasting my time.\r\n", True),
    ("expn", "OK", "a@example.test, b@example.test", b"250-2.1.5 a@example.test\r\n250 2.1.5 b@example.test\r\n",
     False),
    ("expn", "DECLINED", None, b"502 5.5.1 EXPN not supported\r\n", False),
    ("expn", "DENY", None, b"550 5.1.1 No such list\r\n", False),
    ("help", "OK", "line one, line two", b"214-2.0.0 line one\r\n214 2.0.0 line two\r\n", False),
    ("quit", "DENY", None, f"221 2.0.0 {ME} closing connection. Have a wonderful day.\r\n".encode(), True),
    ("unrecognized_command", "DENY_DISCONNECT", '"go away"', b"521 5.5.1 go away\r\n", True),
    ("unrecognized_command", "DECLINED", None, b"500 5.5.1 Unrecognized command\r\n", False),
])
def test_literal_replies(start, hook, code, message, expected, closes) -> None:
    options = {"message": message} if message else {}
    server = start(returns(hook, code, **options) + background(hook))
    client, got = drive(server, hook)
    assert got == expected
    if closes is True:
        assert client.closed()
    elif closes is False:
        assert client.command("RSET") == b"250 2.0.0 OK\r\n"
    client.close()


def test_smtplib_sees_a_mail_denial_and_carries_on(start) -> None:
    server = start(returns("mail", "DENYSOFT", message='"greylisted, come back later"', times="1")
                   + background("mail"))
    with server.smtp() as client:
        client.ehlo()
        assert client.mail("a@client.test") == (450, b"4.7.1 greylisted, come back later")
        assert client.mail("a@client.test")[0] == 250
        assert client.rcpt("bob@example.test")[0] == 250
        assert client.data(b"Subject: x\r\n\r\nhi\r\n") == (250, b"2.0.0 Queued for the test")


# --- plugins that fail: 451, logged, and the next session is fine --------------------


def full_session_works(server) -> None:
    with server.smtp() as client:
        refused = client.sendmail("a@client.test", ["bob@example.test"], b"Subject: ok\r\n\r\nfine\r\n")
    assert refused == {}


@pytest.mark.parametrize("hook", ["mail", "rcpt", "data", "data_post", "queue", "vrfy", "expn", "help"])
def test_plugin_that_raises_answers_451_then_the_server_goes_on(start, hook_log, hook) -> None:
    server = start(returns(hook, "raise", times="1") + background("none"))
    client, got = drive(server, hook)
    assert got == INTERNAL
    assert client.command("RSET") == b"250 2.0.0 OK\r\n"  # this session goes on too
    client.close()
    raised = [r for r in hook_log if f"hook={hook} plugin=returns raised" in r.getMessage()]
    assert raised and raised[0].exc_info is not None and raised[0].levelno == logging.ERROR
    full_session_works(server)


def test_plugin_that_raises_at_connect_closes_with_421(start, hook_log) -> None:
    server = start(returns("connect", "raise", times="1") + background("connect"))
    client, got = drive(server, "connect")
    assert got == INTERNAL_CLOSE and client.closed()
    client.close()
    full_session_works(server)


@pytest.mark.parametrize("hook", ["connect", "mail", "rcpt", "data_headers_end", "queue"])
def test_plugin_that_sleeps_past_plugin_timeout_answers_451(start, hook_log, hook) -> None:
    server = start(returns(hook, "sleep", sleep="30", times="1") + background("none"), plugin_timeout=0.2)
    started = time.monotonic()
    client, got = drive(server, hook)
    took = time.monotonic() - started
    assert got == (INTERNAL_CLOSE if hook == "connect" else INTERNAL)
    assert 0.2 <= took < 5, took
    if hook == "connect":
        assert client.closed()
    else:
        assert client.command("RSET") == b"250 2.0.0 OK\r\n"
    client.close()
    timed_out = [r.getMessage() for r in hook_log if "timed out" in r.getMessage()]
    assert any(f"hook={hook} plugin=returns timed out after 0.2s" in m for m in timed_out), timed_out
    full_session_works(server)  # the same plugin, called again, now declines at once


def test_plugin_own_timeout_option_wins(start, hook_log) -> None:
    server = start(returns("mail", "sleep", sleep="30", timeout="0.1") + background("mail"),
                   plugin_timeout=30)
    client, got = drive(server, "mail")
    assert got == INTERNAL
    assert any("timed out after 0.1s" in r.getMessage() for r in hook_log)
    client.close()


def test_sleeping_plugin_does_not_hold_up_other_sessions(start) -> None:
    server = start(returns("helo", "sleep", sleep="30", times="1") + background("helo"), plugin_timeout=60)
    slow = Client(server)
    slow.reply()
    slow.send(b"HELO slow.test\r\n")
    full_session_works(server)  # while the first session's plugin sleeps
    slow.sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        slow.sock.recv(1)  # that session is still inside its plugin: no reply yet
    slow.close()


@pytest.mark.parametrize("hook", ["mail", "rcpt", "queue", "noop"])
def test_plugin_returning_garbage_answers_451(start, hook_log, hook) -> None:
    server = start(returns(hook, "garbage", times="1") + background("none"))
    client, got = drive(server, hook)
    assert got == INTERNAL
    client.close()
    assert any(f"hook={hook} plugin=returns returned 42" in r.getMessage() for r in hook_log)
    full_session_works(server)


# --- DONE ------------------------------------------------------------------------------


def test_done_at_connect_sends_the_plugin_greeting(start) -> None:
    server = start(returns("connect", "DONE", respond='"220 custom.test at your service"')
                   + background("connect"))
    with server.smtp() as client:
        assert client.ehlo()[0] == 250
        assert client.sendmail("a@client.test", ["bob@example.test"], b"Subject: x\r\n\r\nhi\r\n") == {}
    client, got = drive(server, "connect")
    assert got == b"220 custom.test at your service\r\n"
    client.close()


def test_done_at_connect_can_refuse_and_close(start) -> None:
    server = start(returns("connect", "DONE", respond='"554 not you"', close="yes") + background("connect"))
    client, got = drive(server, "connect")
    assert got == b"554 not you\r\n"
    assert client.closed()
    client.close()


@pytest.mark.parametrize("hook", ["helo", "mail", "rcpt", "data", "vrfy", "noop", "help",
                                  "unrecognized_command", "queue"])
def test_done_with_an_answer_sends_only_that_answer(start, hook) -> None:
    server = start(returns(hook, "DONE", respond='"250 handled by the plugin"') + background(hook))
    client, got = drive(server, hook)
    assert got == b"250 handled by the plugin\r\n"
    assert client.command("RSET") == b"250 2.0.0 OK\r\n"
    client.close()


def test_done_at_quit_still_ends_the_session(start) -> None:
    server = start(returns("quit", "DONE", respond='"221 see you"') + background("quit"))
    client, got = drive(server, "quit")
    assert got == b"221 see you\r\n"
    assert client.closed(), "QUIT ends the session (RFC 5321 4.1.1.10) even when a plugin answered it"
    client.close()


@pytest.mark.parametrize("hook", [h for h in REPLY_TABLE])
def test_done_without_an_answer_is_an_internal_error_never_a_hang(start, hook_log, hook) -> None:
    server = start(returns(hook, "DONE") + background(hook))
    client, got = drive(server, hook)
    if hook in ("pre_connection", "connect"):
        assert got == INTERNAL_CLOSE
        assert client.closed()
    elif hook == "quit":
        # Saying goodbye cannot fail: the normal 221, and the session ends.
        assert got == f"221 2.0.0 {ME} closing connection. Have a wonderful day.\r\n".encode()
        assert client.closed()
    else:
        assert got == INTERNAL
        assert client.command("RSET") == b"250 2.0.0 OK\r\n"
    client.close()


# --- several plugins on one hook ------------------------------------------------------


def test_instances_run_in_config_order_and_the_first_decision_wins(start, plugins_module) -> None:
    server = start(returns("mail", "DECLINED", "returns:3")
                   + returns("mail", "DENY", "returns", message='"second in the file"')
                   + returns("mail", "DENYSOFT", "returns:2", message='"never asked"')
                   + background("mail"))
    client, got = drive(server, "mail")
    assert got == b"550 5.7.1 second in the file\r\n"
    client.close()
    assert plugins_module("returns").CALLS == [("returns:3", "mail"), ("returns", "mail")]


def test_all_instances_run_when_all_decline(start, plugins_module) -> None:
    server = start(returns("mail", "DECLINED", "returns:a") + returns("mail", "DECLINED", "returns:b")
                   + returns("mail", "OK", "returns:c", message='"third said yes"') + background("mail"))
    client, got = drive(server, "mail")
    assert got == b"250 2.1.0 third said yes\r\n"
    client.close()
    assert [label for label, _ in plugins_module("returns").CALLS] == ["returns:a", "returns:b", "returns:c"]


# --- notification hooks ---------------------------------------------------------------


def events_of(plugins_module, conn_id=None):
    events = plugins_module("recorder").EVENTS
    return [e for e in events if conn_id is None or e[1] == conn_id]


def wait_closed(plugins_module, count: int = 1) -> None:
    plugins_module("recorder").wait_for(
        lambda events: sum(1 for e in events if e[0] == "post_connection") >= count)


def test_deny_and_ok_notifications_name_the_deciding_plugin(start, plugins_module) -> None:
    server = start("[[recorder]]\n" + returns("mail", "DENYSOFT", message='"not now"', times="1")
                   + background("mail"))
    with server.smtp() as client:
        client.ehlo()
        assert client.mail("a@client.test")[0] == 450
        assert client.mail("a@client.test")[0] == 250
        assert client.rcpt("bob@example.test")[0] == 250
    wait_closed(plugins_module)
    verdicts = [(hook, detail) for hook, _, detail in events_of(plugins_module) if hook in ("deny", "ok")]
    assert verdicts == [
        ("deny", ("returns", "DENYSOFT", ("not now",), False)),
        ("ok", ("returns:accept", "OK", (), False)),
    ]


def test_internal_errors_are_notified_as_denials(start, plugins_module) -> None:
    server = start("[[recorder]]\n" + returns("mail", "raise") + background("mail"))
    client, got = drive(server, "mail")
    assert got == INTERNAL
    client.close()
    wait_closed(plugins_module)
    denials = [detail for hook, _, detail in events_of(plugins_module) if hook == "deny"]
    assert [(plugin, internal) for plugin, _, _, internal in denials] == [("returns", True)]


def test_reset_disconnect_and_post_connection_fire_in_order(start, plugins_module) -> None:
    server = start("[[recorder]]\n" + background("none"))
    with server.smtp() as client:
        client.ehlo()
        client.mail("a@client.test")
        client.rset()
        client.mail("a@client.test")
        client.rcpt("bob@example.test")
        client.data(b"Subject: x\r\n\r\nhi\r\n")
    wait_closed(plugins_module)
    hooks = [hook for hook, _, _ in events_of(plugins_module) if hook not in ("ok", "deny")]
    assert hooks == ["reset_transaction",  # RSET
                     "queue_post", "reset_transaction",  # the message was queued
                     "disconnect", "post_connection"]
    assert len({conn for _, conn, _ in events_of(plugins_module)}) == 1


def test_disconnect_fires_when_the_client_just_goes(start, plugins_module) -> None:
    server = start("[[recorder]]\n" + background("none"))
    client = Client(server)
    client.reply()
    client.command("EHLO client.test")
    client.command("MAIL FROM:<a@client.test>")
    client.close()  # no QUIT, mid-transaction
    wait_closed(plugins_module)
    hooks = [hook for hook, _, _ in events_of(plugins_module) if hook not in ("ok", "deny")]
    assert hooks == ["reset_transaction", "disconnect", "post_connection"]


def test_disconnect_fires_after_a_closing_denial(start, plugins_module) -> None:
    server = start("[[recorder]]\n" + returns("connect", "DENY"))
    client, got = drive(server, "connect")
    assert got.startswith(b"554 ") and client.closed()
    client.close()
    wait_closed(plugins_module)
    hooks = [hook for hook, _, _ in events_of(plugins_module)]
    assert hooks == ["deny", "disconnect", "post_connection"]


def test_each_session_gets_its_own_notifications(start, plugins_module) -> None:
    server = start("[[recorder]]\n" + background("none"))
    for _ in range(3):
        with server.smtp() as client:
            client.noop()
    wait_closed(plugins_module, 3)
    ids = [conn for hook, conn, _ in events_of(plugins_module) if hook == "post_connection"]
    assert len(set(ids)) == 3


# --- queue: 250 only after an OK ----------------------------------------------------------


def test_queue_declined_by_every_plugin_is_451_and_never_250(start) -> None:
    server = start(returns("queue", "DECLINED", "returns:a") + returns("queue", "DECLINED", "returns:b")
                   + background("queue"))
    client, got = drive(server, "queue")
    assert got == b"451 4.3.0 Queuing declined or disabled; try again later\r\n"
    client.close()
    with server.smtp() as client:
        with pytest.raises(smtplib.SMTPDataError) as error:
            client.sendmail("a@client.test", ["bob@example.test"], b"Subject: x\r\n\r\nhi\r\n")
    assert error.value.smtp_code == 451 and b"Queuing declined" in error.value.smtp_error


def test_no_queue_plugin_at_all_is_451(start) -> None:
    server = start(returns("rcpt", "OK", "returns:accept"))
    client, got = drive(server, "queue")
    assert got == b"451 4.3.0 Queuing declined or disabled; try again later\r\n"
    client.close()


def test_queue_ok_after_declines_is_250(start, plugins_module) -> None:
    server = start(returns("queue", "DECLINED", "returns:a")
                   + returns("queue", "OK", "returns:b", message='"Queued as B"') + background("queue"))
    client, got = drive(server, "queue")
    assert got == b"250 2.0.0 Queued as B\r\n"
    client.close()
    queue_calls = [label for label, hook in plugins_module("returns").CALLS if hook == "queue"]
    assert queue_calls == ["returns:a", "returns:b"]
