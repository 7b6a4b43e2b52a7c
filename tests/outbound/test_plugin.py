"""queue/outbound in the real server (in process, no queue runner): what the client is told."""

from __future__ import annotations

import json
import shutil
import smtplib

import pytest

from outbound_helpers import message
from qpgevent.outqueue import Queue


def outbound_server(make_server, tmp_path):
    return make_server(f"""
[[rcpt_ok]]
  domains = example.test
[[queue/outbound]]
  queue_dir = {tmp_path / "queue"}
""")


def test_250_only_once_the_message_and_its_envelope_are_in_the_queue(make_server, tmp_path):
    server = outbound_server(make_server, tmp_path)
    with server.smtp() as client:
        client.ehlo()
        client.mail("sender@sender.test")
        client.rcpt("a@example.test")
        client.rcpt("b@example.test")
        code, text = client.data(message("queued", to="a@example.test"))
    assert code == 250 and text.startswith(b"2.0.0 queued as ")
    queue = Queue(str(tmp_path / "queue"))
    [queued_id] = queue.ids()
    assert text.decode().endswith(queued_id)
    envelope = json.loads((tmp_path / "queue" / "env" / f"{queued_id}.json").read_text())
    assert envelope["sender"] == "sender@sender.test"
    assert [r["address"] for r in envelope["recipients"]] == ["a@example.test", "b@example.test"]
    assert envelope["received_from"] == "client.example.test [127.0.0.1]"
    stored = b"".join(queue.message_chunks(queued_id))
    assert stored.startswith(b"Received: ") and b"Subject: queued" in stored


def test_a_queue_that_cannot_be_written_is_a_451_and_nothing_half_queued(make_server, tmp_path):
    server = outbound_server(make_server, tmp_path)
    env = tmp_path / "queue" / "env"
    shutil.rmtree(env)
    env.write_text("not a folder any more")  # as root, permissions would not stop us: break the layout
    with server.smtp() as client:
        with pytest.raises(smtplib.SMTPDataError) as refused:
            client.sendmail("sender@sender.test", ["a@example.test"], message("refused", to="a@example.test"))
    assert refused.value.smtp_code == 451
    assert b"4.3.0" in refused.value.smtp_error
    assert list((tmp_path / "queue" / "msg").iterdir()) == []  # the message file was taken back
    assert list((tmp_path / "queue" / "tmp").iterdir()) == []


def test_the_clients_dsn_request_is_queued_with_the_message(make_server, tmp_path):
    """RFC 3461: RET, ENVID (decoded from xtext), NOTIFY and ORCPT reach the envelope the
    bounces are made from."""
    server = outbound_server(make_server, tmp_path)
    with server.smtp() as client:
        client.ehlo()
        assert client.mail("sender@sender.test", ["RET=HDRS", "ENVID=id+2B7"])[0] == 250
        assert client.rcpt("a@example.test", ["NOTIFY=FAILURE,DELAY", "ORCPT=rfc822;A+2Bx@example.test"])[0] == 250
        assert client.rcpt("b@example.test")[0] == 250
        assert client.data(message("dsn", to="a@example.test"))[0] == 250
    [queued_id] = Queue(str(tmp_path / "queue")).ids()
    envelope = json.loads((tmp_path / "queue" / "env" / f"{queued_id}.json").read_text())
    assert (envelope["ret"], envelope["envid"]) == ("HDRS", "id+7")
    a, b = envelope["recipients"]
    assert (a["notify"], a["orcpt"]) == ("FAILURE,DELAY", "rfc822;A+x@example.test")
    assert (b["notify"], b["orcpt"]) == (None, None)
