"""Logging: ids on every line, the text and JSON formats, syslog, and redaction of AUTH secrets."""

from __future__ import annotations

import json
import logging
import os
import socket
import types

import gevent
import pytest

from qpgevent.backends import log as log_module
from qpgevent.connection import Connection
from qpgevent.transaction import Transaction


@pytest.fixture
def configure(tmp_path):
    """``configure(**kwargs)`` -> the log file's path; the logging set-up is restored after."""
    root = logging.getLogger("qpgevent")
    saved = root.handlers[:], root.level, root.propagate

    def setup(**kwargs):
        path = tmp_path / "qpgevent.log"
        kwargs.setdefault("path", str(path))
        log_module.configure(**kwargs)
        return path

    yield setup
    for handler in root.handlers:
        handler.close()
    root.handlers[:], root.level, root.propagate = saved[0], saved[1], saved[2]


def a_session(transaction: bool = False):
    """What SessionLogger reads of a session: its connection and its open transaction."""
    return types.SimpleNamespace(connection=Connection("192.0.2.1", 4321),
                                 current_transaction=Transaction() if transaction else None)


def lines(path) -> list[str]:
    for handler in logging.getLogger("qpgevent").handlers:
        handler.flush()
    return path.read_text(encoding="utf-8").splitlines()


def test_text_lines_carry_the_connection_and_transaction_ids(configure):
    path = configure()
    session = a_session(transaction=True)
    logger = log_module.SessionLogger(logging.getLogger("qpgevent.session"), session)
    logger.info("hook=%s plugin=%s", "rcpt", "rcpt_ok")
    session.current_transaction = None
    logger.info("after the transaction")
    logging.getLogger("qpgevent.server").info("no session here")
    first, second, third = lines(path)
    conn, txn = session.connection.id, "txn="
    assert first.endswith(f"INFO qpgevent.session: conn={conn} {txn}{first.split(txn)[1].split()[0]} "
                          "hook=rcpt plugin=rcpt_ok")
    assert f" {os.getpid()} " in first
    assert second.endswith(f"qpgevent.session: conn={conn} after the transaction")
    assert third.endswith("INFO qpgevent.server: no session here")


def test_json_lines_are_objects_with_ids_and_typed_fields(configure):
    path = configure(format="json")
    session = a_session(transaction=True)
    logger = log_module.SessionLogger(logging.getLogger("qpgevent.session"), session)
    logger.info("disconnect: ip=%s", "192.0.2.1", extra={"fields": {"ip": "192.0.2.1", "messages": 2,
                                                                    "tls": False, "auth": None}})
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("internal error")
    summary, error = (json.loads(line) for line in lines(path))
    assert summary["msg"] == "disconnect: ip=192.0.2.1"
    assert summary["conn"] == session.connection.id and summary["txn"] == session.current_transaction.id
    assert (summary["level"], summary["logger"], summary["pid"]) == ("info", "qpgevent.session", os.getpid())
    assert (summary["ip"], summary["messages"], summary["tls"], summary["auth"]) == ("192.0.2.1", 2, False, None)
    assert summary["time"].endswith("Z") and summary["time"][10] == "T"
    assert error["level"] == "error" and "ValueError: boom" in error["exc"]


def test_a_field_cannot_overwrite_the_message_or_the_ids(configure):
    path = configure(format="json")
    logger = log_module.SessionLogger(logging.getLogger("qpgevent.session"), a_session())
    logger.info("real", extra={"fields": {"msg": "forged", "conn": "forged", "x": 1}})
    (line,) = (json.loads(text) for text in lines(path))
    assert (line["msg"], line["x"]) == ("real", 1) and line["conn"] != "forged"


def test_lines_logged_by_plugins_get_the_ids_of_the_session_their_greenlet_serves(configure):
    path = configure()
    plugin_log = logging.getLogger("qpgevent.plugin.dnsbl")
    first, second = a_session(), a_session(transaction=True)

    def serve(session, text):
        log_module.bind_session(session)
        gevent.sleep(0)  # the other session runs in between: each greenlet keeps its own
        plugin_log.info(text)

    gevent.joinall([gevent.spawn(serve, first, "evidence one"), gevent.spawn(serve, second, "evidence two")])
    plugin_log.info("outside any session")
    found = lines(path)
    assert any(line.endswith(f"conn={first.connection.id} evidence one") for line in found), found
    assert any(f"conn={second.connection.id} txn={second.current_transaction.id} evidence two" in line
               for line in found), found
    assert any(line.endswith("qpgevent.plugin.dnsbl: outside any session") for line in found), found


def test_syslog_gets_the_lines_with_the_facility(tmp_path, configure):
    address = str(tmp_path / "syslog.sock")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(address)
    receiver.settimeout(5)
    try:
        path = configure(path="", syslog=True, syslog_facility="local3", syslog_address=address)
        assert path.exists() is False  # syslog alone: no file, and nothing on standard error
        session = a_session()
        log_module.SessionLogger(logging.getLogger("qpgevent.session"), session).warning("hello syslog")
        datagram = receiver.recv(4096).decode()
    finally:
        receiver.close()
    # RFC 3164 PRI: facility local3 (19) * 8 + severity warning (4).
    assert datagram.startswith(f"<156>qpgevent[{os.getpid()}]: WARNING qpgevent.session: "
                               f"conn={session.connection.id} hello syslog"), datagram


def test_syslog_in_json(tmp_path, configure):
    address = str(tmp_path / "syslog.sock")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(address)
    receiver.settimeout(5)
    try:
        configure(path="", format="json", syslog=True, syslog_address=address)
        logging.getLogger("qpgevent.server").info("structured")
        datagram = receiver.recv(4096).decode().rstrip("\x00")
    finally:
        receiver.close()
    prefix = f"<22>qpgevent[{os.getpid()}]: "  # mail (2) * 8 + info (6)
    assert datagram.startswith(prefix), datagram
    assert json.loads(datagram[len(prefix):])["msg"] == "structured"


def test_an_unreachable_syslog_socket_is_an_error_at_start(tmp_path, configure):
    with pytest.raises(OSError):
        configure(path="", syslog=True, syslog_address=str(tmp_path / "nobody-listens"))


@pytest.mark.parametrize("line, logged", [
    ("AUTH PLAIN AGJvYgBzM2NyZXQ=", "AUTH PLAIN ***"),
    ("auth plain AGJvYgBzM2NyZXQ=", "auth plain ***"),
    ("  AUTH   LOGIN   Ym9i", "  AUTH   LOGIN ***"),
    ("AUTH CRAM-MD5", "AUTH CRAM-MD5"),
    ("AUTH", "AUTH"),
    ("MAIL FROM:<bob@example.test> AUTH=<>", "MAIL FROM:<bob@example.test> AUTH=<>"),
    ("EHLO client.example.test", "EHLO client.example.test"),
    ("AUTHX PLAIN abc", "AUTHX PLAIN abc"),
])
def test_redact_hides_auth_credentials_only(line, logged):
    assert log_module.redact(line) == logged


def test_the_trace_of_a_conversation_in_memory(tmp_path, caplog):
    """Pipelined commands traced in order, each followed by its reply; refused lines
    redacted or not shown; the message by its size. The real conversation, in memory."""
    from qpgevent.engine.conversation import Conversation
    from qpgevent.engine.memory import InMemory
    from qpgevent.server.driver import surroundings
    from qpgevent.testing import DEFAULT_PLUGINS, PluginHarness

    harness = PluginHarness(tmp_path, after=DEFAULT_PLUGINS, settings={"trace": "yes"})
    with caplog.at_level(logging.DEBUG, logger="qpgevent.trace"):  # as configure(trace=True) does
        conversation = Conversation(Connection("192.0.2.1", 4321, "127.0.0.1", 25), harness.runner,
                                    harness.settings, surroundings=surroundings(harness.settings))
        peer = InMemory(conversation)
        peer.open()
        peer.send(b"EHLO client.test\r\nAUTH PLAIN c2VjcmV0!\r\nAUTH PLAIN " + b"A" * 13000 + b"\r\n"
                  b"MAIL FROM:<a@client.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n")
        peer.send(b"Subject: hi\r\n\r\nsecret-body\r\n.\r\nQUIT\r\n")
    lines = [record.getMessage() for record in caplog.records if record.name == "qpgevent.trace"]
    client = [line for line in lines if line.startswith("C: ")]
    assert client == ["C: EHLO client.test", "C: AUTH PLAIN ***", "C: <line not shown>", "C: MAIL FROM:<a@client.test>",
                      "C: RCPT TO:<bob@example.test>", "C: DATA", "C: <message data, 28 octets>", "C: QUIT"], lines
    for command, reply in (("C: MAIL FROM:<a@client.test>", "S: 250 2.1.0"), ("C: DATA", "S: 354"),
                           ("C: <message data, 28 octets>", "S: 250 2.0.0 Queued as")):
        assert lines[lines.index(command) + 1].startswith(reply), lines
    assert all(record.conn == conversation.session.connection.id for record in caplog.records
               if record.name == "qpgevent.trace")
    assert not any("c2VjcmV0" in line or "secret-body" in line for line in lines)


def test_an_untraced_conversation_has_no_trace(tmp_path):
    from qpgevent.engine.conversation import Conversation
    from qpgevent.server.driver import surroundings
    from qpgevent.testing import DEFAULT_PLUGINS, PluginHarness

    harness = PluginHarness(tmp_path, after=DEFAULT_PLUGINS, settings={"trace_clients": "198.51.100.0/24"})
    logger = logging.getLogger("qpgevent.trace")
    saved = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        made = [Conversation(Connection(ip, 4321), harness.runner, harness.settings,
                             surroundings=surroundings(harness.settings)) for ip in ("192.0.2.1", "198.51.100.7")]
    finally:
        logger.setLevel(saved)
    assert [conversation.trace is not None for conversation in made] == [False, True]
