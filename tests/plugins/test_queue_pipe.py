"""queue/pipe: the message on a command's standard input; its exit status is the answer.

With Postfix's own ``sendmail`` (a private Postfix from ``qpgevent.testing.mta``, named
with ``-C``), and with small shell scripts that record what they got, exit 75, fail,
die, or hang.
"""

from __future__ import annotations

import json
import os
import smtplib
import sys
import time

import gevent
import pytest

from qpgevent.core.errors import PluginLoadError
from qpgevent.testing.mta import Postfix


def send(server, recipients, message, sender="sender@client.test"):
    with smtplib.SMTP(server.host, server.port, local_hostname="client.example.test", timeout=60) as smtp:
        smtp.ehlo()
        smtp.mail(sender)
        for recipient in recipients:
            assert smtp.rcpt(recipient)[0] == 250
        return smtp.data(message)


def message(subject: str, body: bytes = b"hello\r\n.dot\r\n") -> bytes:
    # Date and Message-ID given, so that Postfix's cleanup adds none of its own.
    return (f"Subject: {subject}\r\nFrom: sender@client.test\r\nDate: Wed, 25 Nov 2026 12:00:00 +0000\r\n"
            f"Message-ID: <{abs(hash(subject))}@client.test>\r\n\r\n").encode() + body


def pipe(command: str, *options: str) -> str:
    lines = "".join(f"  {option}\n" for option in options)
    return f"[[rcpt_ok]]\n  domains = example.test\n[[queue/pipe]]\n  command = '{command}'\n{lines}"


def script(tmp_path, name: str, body: str):
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


@pytest.fixture
def postfix():
    instance = Postfix(["bob@example.test", "alice@example.test"])
    try:
        yield instance.start()
    finally:
        instance.cleanup()


def from_subject(delivered: bytes) -> bytes:
    return delivered[delivered.index(b"Subject: "):]


def test_sendmail_queues_into_postfix(make_server, postfix):
    sendmail = " ".join(postfix.sendmail())
    server = make_server(pipe(f"{sendmail} -i -f ${{sender}} -- ${{recipient}}"))
    assert send(server, ["bob@example.test", "alice@example.test"], message("piped")) == (250, b"2.0.0 Queued")
    for address in ("bob@example.test", "alice@example.test"):
        (delivered,) = postfix.wait_for_messages(address, 1)
        assert delivered.startswith(b"Return-Path: <sender@client.test>\n")
        assert from_subject(delivered) == message("piped").replace(b"\r\n", b"\n")


def test_sendmail_null_sender(make_server, postfix):
    sendmail = " ".join(postfix.sendmail())
    server = make_server(pipe(f"{sendmail} -i -f ${{sender}} -- ${{recipient}}"))
    assert send(server, ["bob@example.test"], message("bounce"), sender="")[0] == 250
    (delivered,) = postfix.wait_for_messages("bob@example.test", 1)
    assert delivered.startswith(b"Return-Path: <>\n")


def test_sendmail_queues_even_while_postfix_is_stopped(make_server, postfix):
    """sendmail's 0 means the message sits in Postfix's maildrop queue: safe, delivered later."""
    sendmail = " ".join(postfix.sendmail())
    server = make_server(pipe(f"{sendmail} -i -f ${{sender}} -- ${{recipient}}"))
    postfix.stop()
    assert send(server, ["bob@example.test"], message("while stopped"))[0] == 250
    assert postfix.messages("bob@example.test") == []
    postfix.start()
    (delivered,) = postfix.wait_for_messages("bob@example.test", 1)
    assert from_subject(delivered) == message("while stopped").replace(b"\r\n", b"\n")


def test_exit_75_is_a_temporary_failure_with_the_commands_words(make_server, tmp_path):
    command = script(tmp_path, "busy", "cat >/dev/null\necho 'queue is busy, come back later' >&2\nexit 75\n")
    server = make_server(pipe(str(command)))
    assert send(server, ["bob@example.test"], message("busy")) == (451, b"4.3.0 queue is busy, come back later")


@pytest.mark.parametrize("options, expected", [
    ((), (554, b"5.3.0 no such mailbox")),
    (("failure = temp",), (451, b"4.3.0 no such mailbox")),
])
def test_other_exit_statuses(make_server, tmp_path, options, expected):
    command = script(tmp_path, "refuse", "echo 'no such mailbox'\nexit 67\n")  # EX_NOUSER
    server = make_server(pipe(str(command), *options))
    assert send(server, ["bob@example.test"], message("refused")) == expected


def test_killed_by_a_signal_is_temporary(make_server, tmp_path):
    command = script(tmp_path, "crash", "cat >/dev/null\nkill -SEGV $$\n")
    server = make_server(pipe(str(command)))
    assert send(server, ["bob@example.test"], message("crash")) == (451, b"4.3.0 temporary failure, try again later")


def test_a_hung_command_is_killed_with_its_children(make_server, tmp_path):
    pids = tmp_path / "pids"
    # The script and a child of it both hang; both must be gone after the timeout.
    command = script(tmp_path, "hang", f"sleep 300 &\necho $$ $! > {pids}\nwait\n")
    server = make_server(pipe(str(command), "command_timeout = 0.5"))
    assert send(server, ["bob@example.test"], message("hang")) == (
        451, b"4.3.0 queueing took too long, try again later")
    # SIGKILL is sent before the 451; the kernel may take a moment to finish them off.
    deadline = time.monotonic() + 10
    for pid in map(int, pids.read_text().split()):
        while os.path.exists(f"/proc/{pid}") and "zombie" not in _state(pid):
            assert time.monotonic() < deadline, f"{pid} still alive: {_state(pid)}"
            gevent.sleep(0.02)


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/status") as status:
        return next(line for line in status if line.startswith("State:")).lower()


def test_argv_macros_and_no_shell(make_server, tmp_path):
    record = tmp_path / "argv.json"
    recorder = tmp_path / "record.py"
    recorder.write_text("import json, sys\n"
                        f"json.dump(sys.argv[1:], open({str(record)!r}, 'w'))\n"
                        "sys.stdin.buffer.read()\n")
    command = (f"{sys.executable} {recorder} -f ${{sender}} --ip=${{client_address}} --helo ${{client_helo}} "
               "-- ${recipient} u=${user} d=${domain} '$(touch /tmp/pwned) ${queue_id}' ${size}")
    server = make_server(pipe(command))
    evil = '"$(id);x"@example.test'
    body = message("argv")
    assert send(server, ["bob@example.test", evil], body)[0] == 250
    argv = json.loads(record.read_text())
    queue_id, size = argv[-2], argv[-1]
    assert argv[:-2] == ["-f", "sender@client.test", "--ip=127.0.0.1", "--helo", "client.example.test", "--",
                         "bob@example.test", evil, "u=bob", "u=$(id);x", "d=example.test", "d=example.test"]
    assert queue_id.startswith("$(touch /tmp/pwned) ") and len(queue_id.split()[-1]) > 5
    assert int(size) == len(body)  # the message as the client sent it, dot-unstuffed


def test_message_streamed_with_lf_or_crlf(make_server, tmp_path):
    out = tmp_path / "out"
    command = script(tmp_path, "save", f"cat > {out}\n")
    big = message("big", b"".join(b"line %06d \xc3\xa9\r\n" % n for n in range(100000)))  # 1.6 MB
    server = make_server(pipe(str(command)), size_threshold=65536)
    assert send(server, ["bob@example.test"], big)[0] == 250
    saved = out.read_bytes()
    assert saved.startswith(b"Received: from client.example.test")
    assert from_subject(saved) == big.replace(b"\r\n", b"\n") and b"\r" not in saved
    crlf = make_server(pipe(str(command), "line_ending = crlf"))
    assert send(crlf, ["bob@example.test"], big)[0] == 250
    assert from_subject(out.read_bytes()) == big


def test_a_command_that_stops_reading_early_is_judged_by_its_status(make_server, tmp_path):
    command = script(tmp_path, "early", "head -c 10 >/dev/null\nexit 0\n")
    server = make_server(pipe(str(command)), size_threshold=65536)
    big = message("big", b"".join(b"line %06d\r\n" % n for n in range(200000)))
    assert send(server, ["bob@example.test"], big) == (250, b"2.0.0 Queued")


@pytest.mark.parametrize("command, error", [
    ("/bin/true ${nonsense}", r"unknown macro\(s\) nonsense"),
    ("'unbalanced", r"command: No closing quotation"),
])
def test_bad_commands_are_load_errors(make_server, command, error):
    with pytest.raises(PluginLoadError, match=error):
        make_server(f"[[queue/pipe]]\n  command = \"{command}\"\n")


def test_a_missing_program_is_a_temporary_failure(make_server, tmp_path):
    server = make_server(pipe(str(tmp_path / "nowhere")))
    assert send(server, ["bob@example.test"], message("nowhere")) == (
        451, b"4.3.0 cannot queue the message now, try again later")
