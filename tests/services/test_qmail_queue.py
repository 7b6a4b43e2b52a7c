"""queue/qmail_queue: the message on descriptor 0, the envelope on descriptor 1, the exit
status as the answer; through the real server and smtplib, with ``qmail_queue_check.py``
(the protocol's other end, strict about the envelope; qmail is not packaged in Debian)
exiting as told, hanging, or killed while it works."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import gevent
import pytest

from qpgevent.core.errors import PluginLoadError
from service_helpers import message, send, smtp

CHECKER = Path(__file__).with_name("qmail_queue_check.py")


@pytest.fixture
def queued(tmp_path):
    path = tmp_path / "queued"
    path.mkdir()
    return path


def start(make_server, outdir, *args, options=""):
    program = shlex.join([sys.executable, str(CHECKER), str(outdir), *args])
    return make_server(plugins=f"[[rcpt_ok]]\n  domains = example.test\n"
                               f"[[queue/qmail_queue]]\n  program = \"{program}\"\n{options}")


def stored(outdir) -> list[tuple[bytes, bytes]]:
    """(message, envelope) of every message the program queued."""
    names = sorted(p.stem for p in Path(outdir).glob("*.msg"))
    return [((outdir / f"{n}.msg").read_bytes(), (outdir / f"{n}.env").read_bytes()) for n in names]


def test_message_on_fd0_envelope_on_fd1_and_250_after_exit_0(make_server, queued):
    server = start(make_server, queued)
    data = message("hello", "line one\r\n.dot-stuffed by smtplib\r\nline three")
    code, text = send(server, data, "alice@example.test", ["bob@example.test", "carol@example.test"])
    assert (code, text) == (250, "2.0.0 Queued")
    [(mail, envelope)] = stored(queued)
    assert envelope == b"Falice@example.test\0Tbob@example.test\0Tcarol@example.test\0\0"
    assert b"\r" not in mail and mail.endswith(b"\n\nline one\n.dot-stuffed by smtplib\nline three\n")
    assert mail.startswith(b"Received: from mail.example.test")


def test_the_null_sender_is_an_empty_F(make_server, queued):
    server = start(make_server, queued)
    assert send(server, message(), "")[0] == 250
    assert stored(queued)[0][1] == b"F\0Tb@example.test\0\0"


@pytest.mark.parametrize("exit_code,reply", [
    (11, (554, "5.3.0 address too long")),
    (31, (554, "5.3.0 mail server permanently refuses the message")),
    (53, (451, "4.3.0 write error or disk full")),
    (71, (451, "4.3.0 mail server temporarily refuses the message")),
    (81, (451, "4.3.0 internal bug")),
    (99, (451, "4.3.0 qmail-queue exit code 99")),
])
def test_exit_codes_11_to_40_are_permanent_the_others_temporary(make_server, queued, exit_code, reply):
    server = start(make_server, queued, str(exit_code))
    assert send(server, message()) == reply
    assert stored(queued) == []


def test_what_the_program_says_on_stderr_is_the_reason(make_server, queued):
    server = start(make_server, queued, "31", "--say", "simscan: virus found")
    assert send(server, message()) == (554, "5.3.0 simscan: virus found")


def test_a_missing_program_gives_the_fallback(make_server, tmp_path):
    server = make_server(plugins="[[rcpt_ok]]\n  domains = example.test\n"
                                 f"[[queue/qmail_queue]]\n  program = {tmp_path}/no-such-qmail-queue\n")
    assert send(server, message()) == (451, "4.3.0 qmail-queue unavailable, try again later")


def test_a_program_killed_while_it_works_gives_the_fallback(make_server, queued):
    server = start(make_server, queued, "--die", options="  on_failure = reject")
    assert send(server, message()) == (554, "5.3.0 qmail-queue unavailable")
    assert stored(queued) == []


def test_a_hung_program_is_killed_after_call_timeout_and_other_sessions_go_on(make_server, queued):
    server = start(make_server, queued, "--hang", options="  call_timeout = 2")
    waiting = gevent.spawn(send, server, message())
    gevent.wait([waiting], timeout=1.0)
    with smtp(server) as other:
        assert other.noop()[0] == 250
    assert waiting.get(timeout=30) == (451, "4.3.0 qmail-queue unavailable, try again later")
    assert stored(queued) == []


def test_a_large_message_is_streamed(make_server, queued):
    server = start(make_server, queued)
    body = ("y" * 76 + "\r\n") * 40000  # 3 MB: spooled to a file past the 1 MiB threshold
    assert send(server, message("big", body))[0] == 250
    [(mail, _)] = stored(queued)
    assert mail.count(b"\n") > 40000 and b"\r" not in mail


def test_accept_is_not_a_choice_for_a_queue(plugin_harness):
    with pytest.raises(PluginLoadError, match="on_failure"):
        plugin_harness("queue/qmail_queue", on_failure="accept")


def test_the_checker_refuses_a_bad_envelope(tmp_path):
    # the protocol's other end really checks: a recipient without T is an envelope format error
    (tmp_path / "message").write_bytes(b"Subject: x\n\nhi\n")
    (tmp_path / "envelope").write_bytes(b"Fa@example.test\0b@example.test\0\0")
    (tmp_path / "out").mkdir()
    with open(tmp_path / "message", "rb") as fd0, open(tmp_path / "envelope", "rb") as fd1:
        status = subprocess.run([sys.executable, str(CHECKER), str(tmp_path / "out")], stdin=fd0, stdout=fd1,
                                timeout=30).returncode
    assert status == 91 and list((tmp_path / "out").iterdir()) == []
