"""Issue 21, item 5: what a client (or a proxy) writes never reaches a header or a log line raw.

A trusted PROXY v1 header could name an IPv6 address with a scope id holding a bare CR
and markup (``ipaddress`` takes anything after ``%``); it reached the Received header and
the log. Now a v1 line is strict (printable ASCII, no scope ids, ports in range) and the
proxy gets 421. Whatever else a client writes (HELO, commands) is escaped in the log
(``\\xNN``) and cannot forge our Received comment. Black-box: the real ``qpgevent``.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import socket

import pytest

from qpgevent.backends import log as qlog
from qpgevent.core.headers import Headers
from qpgevent.core.proxy import ProxyError, parse
from qpgevent.testing import maildir_messages, wait_until

EVIL_SCOPE = "fe80::1%\rX-Forged:<b>owned</b>"


@pytest.mark.parametrize("line", [
    f"PROXY TCP6 {EVIL_SCOPE} ::1 40000 25\r\n",
    "PROXY TCP6 fe80::1%eth0 ::1 40000 25\r\n",
    "PROXY TCP6 ::1 fe80::1%25 40000 25\r\n",
    "PROXY TCP4 192.0.2.7 198.51.100.25 40000 25\x00\r\n",
    "PROXY TCP4 192.0.2.7\t198.51.100.25 40000 25\r\n",
    "PROXY TCP4 192.0.2.7 198.51.100.25 65536 25\r\n",
    "PROXY TCP4 192.0.2.7 198.51.100.25 40000 -1\r\n",
    "PROXY TCP4 192.0.2.7 198.51.100.25 +4000 25\r\n",
    "PROXY TCP4 192.0.2.07 198.51.100.25 40000 25\r\n",
    "PROXY TCP4 ::1 198.51.100.25 40000 25\r\n",
])
def test_a_v1_line_is_strict(line):
    with pytest.raises(ProxyError) as raised:
        parse(line.encode("latin-1"))
    assert "\r" not in str(raised.value) and "\x00" not in str(raised.value)


def test_good_v1_lines_still_parse():
    header, used = parse(b"PROXY TCP6 2001:db8::7 ::1 65535 0\r\nEHLO")
    assert (header.source_ip, header.source_port, header.dest_ip, header.dest_port, used) == (
        "2001:db8::7", 65535, "::1", 0, 36)


def test_a_bare_cr_in_a_header_value_becomes_folding():
    headers = Headers()
    headers.add("X-Test", "a\rX-Forged: yes")
    raw = headers.as_bytes()
    assert raw == b"X-Test: a\r\n\tX-Forged: yes\r\n"
    assert raw.count(b"\r") == raw.count(b"\r\n")


def test_the_text_log_escapes_control_characters(tmp_path):
    path = tmp_path / "log"
    qlog.configure(path=str(path))
    try:
        logging.getLogger("qpgevent.test").warning("helo %s", "x\r\n2026-01-01 forged line\x1b[31m\u2028")
    finally:
        qlog.configure()
    text = path.read_text()
    assert text.count("\n") == 1, text
    assert "x\\x0d\\x0a2026-01-01 forged line\\x1b[31m\\u2028" in text


def read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


def test_a_scope_id_with_cr_and_markup_gets_421_and_reaches_nothing(server_process):
    process = server_process(proxy_trusted="127.0.0.1", workers=1)
    with socket.create_connection(("127.0.0.1", process.port), timeout=10) as sock:
        sock.sendall(f"PROXY TCP6 {EVIL_SCOPE} ::1 40000 25\r\n".encode()
                     + b"EHLO c.test\r\nMAIL FROM:<a@c.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
                     + b"Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n")
        assert read_all(sock) == b"421 4.7.0 mx.example.test Bad PROXY header, closing connection\r\n"
    log = wait_until(lambda: "bad PROXY header" in process.log() and process.log(), 20, "the refusal logged")
    assert "\r" not in log and "<b>" not in log and "X-Forged" not in log.replace("\\rX-Forged", "")
    assert maildir_messages(process.maildir) == {}


def test_helo_text_cannot_forge_the_received_comment_nor_the_log(server_process):
    process = server_process(proxy_trusted="127.0.0.1", workers=1)
    with socket.create_connection(("127.0.0.1", process.port), timeout=10) as sock:
        sock.sendall(b"PROXY TCP4 192.0.2.7 198.51.100.25 40000 25\r\n"
                     b"EHLO forged.example([192.0.2.1])\x1b[2J\r\nMAIL FROM:<a@c.test>\r\n"
                     b"RCPT TO:<bob@example.test>\r\nDATA\r\n")
        reader = sock.makefile("rb")
        replies = [reader.readline() for _ in range(3)]
        while replies[-1][3:4] == b"-":
            replies.append(reader.readline())
        replies += [reader.readline(), reader.readline(), reader.readline()]
        assert replies[-1].startswith(b"354"), replies
        sock.sendall(b"Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n")
        assert reader.readline().startswith(b"250"), replies
    [message] = maildir_messages(process.maildir).values()
    received = re.search(rb"^Received: (.*?)\r\n(?=\S)", message, re.S | re.M).group(1).decode()
    first = received.split("\r\n")[0]
    # Our comment names the proxied client; the client's text opens no comment, no literal.
    assert first == "from forged.example??192.0.2.1????2J (unknown [192.0.2.7])", first
    log = wait_until(lambda: "disconnect" in process.log() and process.log(), 20, "the session's summary")
    assert "\x1b" not in log
    assert "\\x1b[2J" in log


def test_an_auth_user_name_cannot_forge_a_log_line(server_process):
    plugins = "[[auth/flat_file]]\n  users = users.auth\n[[rcpt_ok]]\n  domains = example.test\n"
    process = server_process(plugins, listen="127.0.0.1:0/plainauth", auth_failure_delay=0, workers=1)
    (process.maildir.parent / "users.auth").write_text("")
    forged = "x\r\n2026-12-07 00:00:00,000 1 INFO qpgevent.session: forged\x1b[2J"
    response = base64.b64encode(b"\0" + forged.encode() + b"\0secret").decode()
    with socket.create_connection(("127.0.0.1", process.port), timeout=10) as sock:
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"220")
        sock.sendall(b"EHLO c.test\r\n")
        while reader.readline()[3:4] != b" ":
            pass
        sock.sendall(f"AUTH PLAIN {response}\r\nQUIT\r\n".encode())
        assert reader.readline().startswith(b"535")
    log = wait_until(lambda: "disconnect" in process.log() and process.log(), 20, "the session's summary")
    assert "AUTH PLAIN failed for user=x\\x0d\\x0a2026-12-07" in log, log
    assert not re.search(r"^2026-12-07 00:00:00", log, re.M)
    assert "\x1b" not in log and "\r" not in log


def test_the_json_log_escapes_control_characters_too(tmp_path):
    path = tmp_path / "log"
    qlog.configure(path=str(path), format="json")
    try:
        logging.getLogger("qpgevent.test").warning("helo %s", "x\r\ny\x1b\x85\u2028")
    finally:
        qlog.configure()
    [line] = path.read_text().splitlines()
    assert json.loads(line)["msg"] == "helo x\\x0d\\x0ay\\x1b\\x85\\u2028"
