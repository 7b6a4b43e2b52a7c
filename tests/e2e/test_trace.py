"""The protocol trace ([logging] trace, trace_clients): each client line and each reply line
of a traced session, with its conn id; never an AUTH secret nor a message's text; nothing
of it when the trace is off, even at debug level.

``python -m qpgevent`` as a child (the trace's logger is set up as an operator's server
sets it up), smtplib with STARTTLS and AUTH against it; the log is the server's output.
"""

from __future__ import annotations

import base64
import re
import smtplib

from qpgevent.engine.trace import wanted
from qpgevent.config import _networks

from tls_helpers import AUTH_PLUGINS, USERS, Certs, write_users

ALICE, ALICE_PW = "alice@example.test", USERS["alice@example.test"]
BODY = "the-body-marker-3f9a must never be logged"
MESSAGE = f"From: {ALICE}\r\nSubject: secret-subject-77\r\n\r\n{BODY}\r\n".encode()


def command(client: smtplib.SMTP, line: str) -> int:
    client.putcmd(line)
    return client.getreply()[0]


def traced_lines(log: str, conn: str) -> list[str]:
    """The trace lines of ``conn``, without time, pid, logger and ids."""
    return [re.sub(r"^txn=\S+ ", "", line.split(f"conn={conn} ", 1)[1]) for line in log.splitlines()
            if " DEBUG qpgevent.trace: " in line and f"conn={conn} " in line]


def test_a_traced_session_shows_commands_and_replies_but_no_secret_and_no_body(server_process, tmp_path):
    write_users(tmp_path)
    certs = Certs(tmp_path)
    certs.issue()
    server = server_process(AUTH_PLUGINS, tls_certificate="server.pem", auth_failure_delay=0, trace="yes",
                            workers=1)
    plain = base64.b64encode(f"\0{ALICE}\0{ALICE_PW}".encode()).decode()
    login_user, wrong = base64.b64encode(ALICE.encode()).decode(), base64.b64encode(b"wrong-pw").decode()
    with server.smtp(timeout=10) as client:
        client.starttls(context=certs.client_context())
        client.ehlo()
        assert command(client, "AUTH LOGIN") == 334
        assert command(client, login_user) == 334
        assert command(client, wrong) == 535
        assert command(client, f"AUTH PLAIN {plain}") == 235
        client.sendmail(ALICE, ["bob@example.test"], MESSAGE)
    assert server.terminate() == 0
    log = server.log()
    conn = re.search(r"conn=(\S+) C: ehlo client\.example\.test", log, re.I).group(1)
    # smtplib writes most verbs in lower case ("mail FROM:<...>"): compare client lines so.
    lines = ["C: " + line[3:].lower() if line.startswith("C: ") else line for line in traced_lines(log, conn)]
    text = "\n".join(lines)
    assert lines[0].startswith("S: 220 mx.example.test "), text
    for expected in ("C: starttls", "C: auth login", "S: 334 VXNlcm5hbWU6", "C: <auth response>",
                     "C: auth plain ***", "C: data", "C: quit"):
        assert expected in lines, (expected, lines)
    for start in ("S: 250-mx.example.test", "S: 535 ", "S: 235 ", "C: mail from:<alice@example.test>",
                  "C: rcpt to:<bob@example.test>", "S: 354 ", "S: 250 2.0.0 Queued as ", "S: 221 "):
        assert any(line.startswith(start) for line in lines), (start, text)
    assert any(line.startswith("-- TLS handshake done: TLSv1.") for line in lines), text
    (octets,) = (int(m) for m in re.findall(r"^C: <message data, (\d+) octets>$", text, re.M))
    assert octets >= len(MESSAGE)
    # In order: the reply follows its command.
    assert lines.index("C: auth plain ***") < next(i for i, line in enumerate(lines) if line.startswith("S: 235 "))
    for secret in (ALICE_PW, plain, login_user, wrong, "wrong-pw", BODY, "secret-subject-77"):
        assert secret not in log


def test_no_trace_by_default_even_at_debug_level(server_process):
    server = server_process(level="debug", workers=1)
    with server.smtp(timeout=10) as client:
        client.sendmail("a@client.test", ["bob@example.test"], MESSAGE)
    assert server.terminate() == 0
    log = server.log()
    assert " DEBUG " in log and "disconnect: " in log  # debug lines are kept, and the session happened
    assert "qpgevent.trace" not in log and " C: " not in log and " S: " not in log
    assert BODY not in log


def test_trace_clients_traces_those_clients_only(server_process):
    server = server_process(listen="127.0.0.1:0, [::1]:0", trace_clients="::1/128", workers=1)
    v4, v6 = server.ports
    for host, port in (("127.0.0.1", v4), ("::1", v6)):
        with smtplib.SMTP(host, port, local_hostname="client.example.test", timeout=10) as client:
            assert client.noop()[0] == 250
    assert server.terminate() == 0
    log = server.log()
    ids = dict(re.findall(r"conn=(\S+) connect from (\S+?):\d+ ", log))
    (traced,) = [conn for conn, peer in ids.items() if peer == "[::1]"]
    (untraced,) = [conn for conn, peer in ids.items() if peer == "127.0.0.1"]
    assert "C: noop" in traced_lines(log, traced) and "C: QUIT" in traced_lines(log, traced)
    assert traced_lines(log, untraced) == []


def test_which_clients_are_traced():
    networks = _networks(["192.0.2.0/24", "2001:db8::1"], "x.ini", [], ["logging"], "trace_clients")
    assert wanted(False, networks, "192.0.2.77") and wanted(False, networks, "2001:db8::1")
    assert not wanted(False, networks, "198.51.100.1") and not wanted(False, (), "192.0.2.77")
    assert wanted(True, (), "198.51.100.1")
