"""swaks, the SMTP swiss army knife, as a real outside client of the real server.

swaks prints its whole conversation (`` -> `` what it sent, ``<-`` / ``<**`` what it got),
so each delivered message is checked against the exact lines swaks put on the wire,
dot-unstuffed (RFC 5321 4.5.2), and not against a guess of what swaks adds.
Exit codes as in swaks(1): 0 delivered, 24 no recipient accepted.
"""

from __future__ import annotations

import subprocess

import pytest

from qpgevent.testing import maildir_messages, strip_trace

SENDER = "a@client.test"


def swaks(server, *args: str) -> subprocess.CompletedProcess[str]:
    command = ["swaks", "--server", f"{server.host}:{server.port}", "--helo", "client.example.test",
               "--from", SENDER, "--timeout", "10", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=30)


def sent_message(transcript: str) -> bytes:
    """The message swaks sent: its `` -> `` lines after the 354, unstuffed, up to the dot."""
    lines = transcript.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("<-  354"))
    message = []
    for line in lines[start + 1:]:
        assert line.startswith(" -> "), line
        text = line[4:]
        if text == ".":
            return "".join(t + "\r\n" for t in message).encode("utf-8")
        message.append(text[1:] if text.startswith(".") else text)
    raise AssertionError("no final dot in swaks' transcript")


def test_message_is_delivered_with_the_body_intact(server):
    body = "Hello from swaks.\n.a line with a leading dot\n\nafter an empty line"
    result = swaks(server, "--to", "bob@example.test", "--body", body)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "<-  250 2.0.0 Queued as " in result.stdout
    (delivered,) = maildir_messages(server.maildir).values()
    message = strip_trace(delivered)
    assert message == sent_message(result.stdout)
    header, _, received_body = message.partition(b"\r\n\r\n")
    assert b"\r\nX-Mailer: swaks" in b"\r\n" + header
    assert received_body.startswith(body.replace("\n", "\r\n").encode() + b"\r\n")


def test_pipelined_session_delivers_one_message_for_two_recipients(server):
    result = swaks(server, "--pipeline", "--to", "bob@example.test,carol@example.test",
                   "--body", "pipelined")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    # RFC 2920: MAIL, both RCPTs and DATA went out before the first of their replies came.
    assert out.index(" -> DATA") < out.index("<-  250 2.1.0")
    # RFC 2920 3.2: the replies come back in the order of the commands.
    replies = ["<-  250 2.1.0", "<-  250 2.1.5 <bob@example.test>",
               "<-  250 2.1.5 <carol@example.test>", "<-  354"]
    positions = [out.index(reply) for reply in replies]
    assert positions == sorted(positions)
    (delivered,) = maildir_messages(server.maildir).values()
    assert strip_trace(delivered) == sent_message(out)


def test_data_from_a_file_arrives_byte_exact(server, tmp_path):
    content = ("Subject: from a file\nFrom: a@client.test\nTo: bob@example.test\n\n"
               "first line\n.\n..two dots\n.leading dot\ncafé, 8-bit text\nlast line\n")
    path = tmp_path / "message.eml"
    path.write_bytes(content.encode("utf-8"))
    result = swaks(server, "--to", "bob@example.test", "--data", f"@{path}")
    assert result.returncode == 0, result.stdout + result.stderr
    (delivered,) = maildir_messages(server.maildir).values()
    sent = sent_message(result.stdout)
    assert sent.startswith(content.replace("\n", "\r\n").encode("utf-8"))
    assert strip_trace(delivered) == sent


@pytest.mark.parametrize("pipeline", [False, True], ids=["one-by-one", "pipelined"])
def test_relaying_to_another_domain_is_refused(server, pipeline):
    extra = ["--pipeline"] if pipeline else []
    result = swaks(server, *extra, "--to", "victim@elsewhere.test", "--body", "relay me")
    assert result.returncode == 24, result.stdout + result.stderr  # no RCPTs accepted
    assert "<** 550 5.7.1 Relaying denied" in result.stdout
    if pipeline:
        # RFC 2920 3.1: DATA after every RCPT failed gets 554, not 354 then nothing.
        assert "<** 554 5.5.1 No valid recipients" in result.stdout
    assert maildir_messages(server.maildir) == {}


def test_refused_recipient_does_not_stop_the_accepted_one(server):
    result = swaks(server, "--to", "victim@elsewhere.test,bob@example.test", "--body", "half")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "<** 550 5.7.1 Relaying denied" in result.stdout
    (delivered,) = maildir_messages(server.maildir).values()
    assert b"\tfor <bob@example.test>;" in delivered  # the Received header: one recipient
    assert strip_trace(delivered) == sent_message(result.stdout)
