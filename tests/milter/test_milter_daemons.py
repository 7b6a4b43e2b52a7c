"""The milter plugin in the real server, against the real Debian milters started by the tests:
OpenDKIM signs (the signature in the delivered file verifies with dkimpy), clamav-milter
refuses a message with the test virus (its code and text reach the client), rspamd's milter
proxy refuses GTUBE and marks spam with a header, and two milters in one chain."""

from __future__ import annotations

import base64

import dkim

from qpgevent.testing import maildir_messages
from qpgevent.testing.scanners import EICAR, EICAR_NAME, GTUBE

from milter_helpers import delivered, message, milter_ini, send


def test_opendkim_signs_and_the_delivered_signature_verifies(make_server, opendkim):
    server = make_server(plugins=milter_ini(("opendkim", opendkim.address)))
    code, text = send(server, message())
    assert code == 250, text
    [mail] = delivered(server)
    signed = mail.split(b"\r\n", 1)[1]  # the Maildir's Return-Path is added after signing
    assert signed.startswith(b"DKIM-Signature:"), signed[:300]
    assert dkim.verify(signed, dnsfunc=opendkim.dnsfunc)
    assert b"d=example.test" in signed and b"s=qpg" in signed


def virus_message(payload: bytes) -> bytes:
    part = base64.b64encode(payload).decode()
    return ("From: a@example.test\r\nTo: b@example.test\r\nSubject: x\r\nMIME-Version: 1.0\r\n"
            "Content-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\n"
            "Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            f"{part}\r\n--B--\r\n").encode()


def test_clamav_milter_refuses_the_test_virus_with_its_own_code_and_text(make_server, clamav_milter):
    server = make_server(plugins=milter_ini(("clamav", clamav_milter.address)))
    code, text = send(server, virus_message(EICAR))
    assert (code, text) == (550, f"5.7.1 Virus found: {EICAR_NAME}")
    assert delivered(server) == []
    assert send(server, virus_message(b"harmless"))[0] == 250
    [mail] = delivered(server)
    assert b"X-Virus-Status: Clean\r\n" in mail and b"X-Virus-Scanned: clamav-milter" in mail


def test_rspamd_milter_refuses_gtube_and_marks_spam(make_server, rspamd):
    server = make_server(plugins=milter_ini(("rspamd", rspamd.address)))
    assert send(server, message(subject="t", body=GTUBE)) == (554, "5.7.1 Gtube pattern")
    assert send(server, message(subject="QPG-SPAM", body="hello"))[0] == 250
    assert send(server, message(subject="lunch?", body="hello"))[0] == 250
    spam, ham = sorted(delivered(server), key=lambda mail: b"QPG-SPAM" not in mail)
    assert b"\r\nX-Spam: Yes\r\n" in spam
    assert b"X-Spam:" not in ham


def test_two_milters_in_a_chain_both_act_on_the_message(make_server, opendkim, clamav_milter):
    server = make_server(plugins=milter_ini(("opendkim", opendkim.address), ("clamav", clamav_milter.address)))
    assert send(server, message())[0] == 250
    [mail] = delivered(server)
    signed = mail.split(b"\r\n", 1)[1]
    assert signed.startswith(b"DKIM-Signature:") and b"\r\nX-Virus-Status: Clean\r\n" in signed
    assert dkim.verify(signed, dnsfunc=opendkim.dnsfunc)
    # the second milter's refusal stands, whatever the first one did
    infected = virus_message(EICAR).replace(b"From: a@example.test", b"From: Alice <alice@example.test>")
    assert send(server, infected) == (550, f"5.7.1 Virus found: {EICAR_NAME}")
    assert len(delivered(server)) == 1


def test_opendmarc_adds_its_verdict_and_refuses_mail_that_fails_the_policy(plugin_harness, opendmarc, tmp_path):
    # Through the harness (real loader, session, hook runner; the real opendmarc over its
    # socket) because the client address matters: opendmarc's own SPF check passes loopback
    # clients whatever the record says, and the SPF record lists 192.0.2.0/24 only.
    harness = plugin_harness(None, after=milter_ini(("opendmarc", opendmarc.address)))
    session = ["EHLO client.example.test", "MAIL FROM:<alice@example.test>", "RCPT TO:<bob@example.org>", "DATA"]
    assert harness.run_session(session + [message().decode(), "QUIT"], ip="192.0.2.25").codes[-2] == 250
    [mail] = maildir_messages(harness.directory / "Maildir").values()
    # its two fields under our authserv-id join the one Authentication-Results the server writes
    head = mail.split(b"\r\n\r\n", 1)[0].decode().replace("\r\n\t", " ")
    [results] = [f for f in head.split("\r\n") if f.startswith("Authentication-Results:")]
    assert results.startswith("Authentication-Results: mx.example.test;")
    assert {"spf=pass smtp.mailfrom=example.test", "dmarc=pass header.from=example.test"} <= {
        part.strip() for part in results.split(";")}
    refused = harness.run_session(session + [message().decode(), "QUIT"], ip="203.0.113.5")
    assert refused.replies[-2] == (550, "5.7.1 rejected by DMARC policy for example.test")
    assert len(maildir_messages(harness.directory / "Maildir")) == 1
