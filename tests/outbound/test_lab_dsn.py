"""End to end: the DSN request (RFC 3461) and REQUIRETLS (RFC 8689) through the outbound queue,
in the lab internet: real Postfix MXs (with and without DSN), a qpgevent MX offering REQUIRETLS."""

from __future__ import annotations

import email
import re
import smtplib
import ssl
from email.message import Message

from outbound_helpers import message, queued, with_subject
from qpgevent.outqueue import Queue
from qpgevent.testing.outbound_lab import LabPostfix, lab_smtp
from qpgevent.testing import wait_until


def send_with(internet, sender, mail_options, recipients, body, tls=False):
    """One message from the lab client to the MTA: MAIL ``mail_options``, RCPT each
    recipient with its options; inside TLS when ``tls``."""
    with lab_smtp(internet.lab, "client", "198.18.0.10") as client:
        if tls:
            context = ssl.create_default_context(cafile=str(internet.ca_file))
            context.check_hostname = False  # dialled by address; our MTA's TLS is not under test here
            client.starttls(context=context)
        client.ehlo()
        assert client.has_extn("dsn")
        assert client.mail(sender, mail_options)[0] == 250
        for address, options in recipients.items():
            assert client.rcpt(address, options)[0] == 250, address
        code, text = client.data(body)
        assert code == 250, text


def reports_from(mailbox_messages, reporting_mta, subject):
    """The RFC 3464 reports made by ``reporting_mta`` about the message with ``subject``."""
    found = []
    for raw in mailbox_messages:
        report = email.message_from_bytes(raw)
        if report.get_content_type() != "multipart/report":
            continue
        _, status, returned = report.get_payload()
        if status.get_payload()[0]["Reporting-MTA"] == f"dns; {reporting_mta}" and \
                f"Subject: {subject}".encode() in returned.as_bytes():
            found.append(report)
    return found


def blocks_of(report: Message) -> tuple[Message, dict[str, Message]]:
    """(per-message fields, {Final-Recipient: per-recipient fields}) of a delivery-status report."""
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    _, status, _ = report.get_payload()
    assert status.get_content_type() == "message/delivery-status"
    per_message, *per_recipient = status.get_payload()
    return per_message, {block["Final-Recipient"]: block for block in per_recipient}


def test_the_dsn_request_goes_on_to_a_next_hop_offering_dsn_and_we_send_no_notice(internet, start_mta, tmp_path):
    start_mta()
    send_with(internet, "sender@sender.test", ["RET=HDRS", "ENVID=QQ314+2B1"],
              {"a@pref.test": ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;a+2Balias@pref.test"]},
              message("passed on"))
    with_subject(internet.mx1, "a@pref.test", "passed on")
    # mx1 logs the commands of its peer (debug_peer_list): the request arrived, as xtext.
    log = wait_until(lambda: "RCPT TO:<a@pref.test> NOTIFY" in internet.mx1.log() and internet.mx1.log(), 30,
                     "mx1's log of our RCPT")
    assert re.search(r"MAIL FROM:<sender@sender\.test>.* RET=HDRS ENVID=QQ314\+2B1", log), log
    assert "RCPT TO:<a@pref.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a+2Balias@pref.test" in log, log
    # Postfix honours it: its own success notice ("delivered") carries our ENVID and ORCPT.
    [delivered] = wait_until(lambda: reports_from(internet.mx1.messages("sender@sender.test"), "mx1.lab.test",
                                                  "passed on"), 30, "Postfix's success notice")
    per_message, blocks = blocks_of(delivered)
    assert per_message["Original-Envelope-Id"] == "QQ314+1"
    assert blocks["rfc822; a@pref.test"]["Action"] == "delivered"
    assert blocks["rfc822; a@pref.test"]["Original-Recipient"] == "rfc822;a+alias@pref.test"  # as Postfix writes it
    # Once the queue is empty, any notice of ours would have been delivered (it is queued
    # before the message leaves the queue): there is none.
    wait_until(lambda: not queued(tmp_path / "queue"), 30, "the queue empty")
    assert reports_from(internet.mx1.messages("sender@sender.test"), "mta.lab.test", "passed on") == []


def test_notify_success_to_a_next_hop_without_dsn_gets_one_relayed_report(internet, start_mta, tmp_path):
    mx4 = LabPostfix(internet.lab, "mx4", "198.18.0.24", ["late@late.test", "late2@late.test", "late3@late.test"],
                     main={"smtpd_discard_ehlo_keywords": "dsn", "debug_peer_list": "198.18.0.10"})
    mx4.start()
    try:
        server = start_mta()
        send_with(internet, "sender@sender.test", ["RET=FULL", "ENVID=relay+2D1"], {
            "late@late.test": ["NOTIFY=SUCCESS", "ORCPT=rfc822;first@late.test"],
            "late2@late.test": ["NOTIFY=SUCCESS,FAILURE"],
            "late3@late.test": ["NOTIFY=FAILURE"],  # asked no success notice
        }, message("relayed"))
        for address in ("late@late.test", "late2@late.test", "late3@late.test"):
            with_subject(mx4, address, "relayed")
        [report] = wait_until(lambda: reports_from(internet.mx1.messages("sender@sender.test"), "mta.lab.test",
                                                   "relayed"), 30, "our relayed report")
        assert report["Return-Path"] == "<>"
        assert report["Subject"] == "Successful Mail Delivery Report"
        per_message, blocks = blocks_of(report)
        assert per_message["Original-Envelope-Id"] == "relay-1"
        # Both recipients that asked, in one report; not the third.
        assert set(blocks) == {"rfc822; late@late.test", "rfc822; late2@late.test"}
        for block in blocks.values():
            assert block["Action"] == "relayed"
            assert block["Status"].startswith("2.")
            assert block["Remote-MTA"] == "dns; 198.18.0.24"
        assert blocks["rfc822; late@late.test"]["Original-Recipient"] == "rfc822; first@late.test"
        assert "Original-Recipient" not in blocks["rfc822; late2@late.test"]
        # A success report returns the header only (RFC 3461 4.3), whatever RET said.
        assert report.get_payload()[2].get_content_type() == "text/rfc822-headers"
        # The hop heard none of the request (it did not offer DSN).
        assert "NOTIFY=" not in mx4.log() and "ENVID=" not in mx4.log()
        wait_until(lambda: not queued(tmp_path / "queue"), 30, "the queue empty")
        assert len(reports_from(internet.mx1.messages("sender@sender.test"), "mta.lab.test", "relayed")) == 1
        assert "(relayed) to <sender@sender.test> for 2 recipient(s)" in server.log()
    finally:
        mx4.cleanup()


def test_requiretls_delivers_only_over_verified_tls_to_a_hop_offering_it(internet, start_mta, start_lab_server,
                                                                         tmp_path):
    # mx4: qpgevent, which offers REQUIRETLS inside TLS; its certificate is valid for mx4.lab.test.
    chain, key = internet.certificate("mx4.lab.test")
    receiver = start_lab_server("mx4", "[[rcpt_ok]]\n  domains = late.test, unauth.test, static.test\n"
                                "[[queue/maildir]]\n  path = Maildir\n",
                                tls_certificate=str(chain), tls_key=str(key),
                                logging_level="debug", logging_trace="yes")
    maildir = tmp_path / "mx4" / "Maildir" / "new"
    # static.test goes by a static route, named by host name: the route is taken as it is
    # (no MX to authenticate), its name found through [dns] and its certificate checked.
    server = start_mta(tls=True, routes=["static.test:mx4.lab.test:25"])
    send_with(internet, "sender@late.test", ["REQUIRETLS"], {
        "r@static.test": [],
        # mx4: its MX named by late.test's MTA-STS policy, verified TLS (PKIX, mx4.lab.test),
        # REQUIRETLS offered: delivered
        "late@late.test": [],
        "u@unauth.test": [],  # mx4 too, but neither a validated MX answer nor a policy names it: fails
        "a@pref.test": [],  # the same for mx1 (Postfix): fails before any connection
        "s@stsok.test": [],  # mx1, named by an enforce policy, verified TLS, no REQUIRETLS: fails
        "s@sts.test": [],  # mx2, named by its policy: its certificate names another host: fails
        "x@good.dane.test": [],  # mx1 by DANE (a validated MX): the certificate matches; no REQUIRETLS: fails
        "y@bad.dane.test": [],  # mx1 under a TLSA record it does not match: fails
        # MX 10 mx3 cannot be reached (it might have had good TLS), MX 20 mx2 has a bad
        # certificate: not delivered, and only deferred.
        "c@stsfallback.test": [],
    }, message("secret", sender="sender@late.test", to="late@late.test"), tls=True)

    def arrived():
        found = [email.message_from_bytes(path.read_bytes()) for path in maildir.iterdir()] if maildir.is_dir() else []
        return len(found) >= 3 and found
    messages = wait_until(arrived, 60, "the message (twice: late.test and static.test) and the notice at mx4")
    delivered, _ = [m for m in messages if m["Subject"] == "secret"]
    [notice] = [m for m in messages if m.get_content_type() == "multipart/report"]
    log = receiver.log()
    # It went with REQUIRETLS on MAIL (offered only inside TLS), and the notice did too.
    assert re.search(r"C: MAIL FROM:<sender@late\.test>.* REQUIRETLS", log), log
    assert re.search(r"C: MAIL FROM:<> .*REQUIRETLS", log), log
    assert "Subject: secret" in delivered.as_string()
    _, blocks = blocks_of(notice)
    assert set(blocks) == {"rfc822; u@unauth.test", "rfc822; a@pref.test", "rfc822; s@stsok.test",
                           "rfc822; s@sts.test", "rfc822; x@good.dane.test", "rfc822; y@bad.dane.test"}
    for block in blocks.values():
        assert block["Action"] == "failed" and block["Status"] == "5.7.10"
    for address in ("u@unauth.test", "a@pref.test"):
        assert "neither DNSSEC-validated nor named by an MTA-STS policy" in blocks[f"rfc822; {address}"]["Diagnostic-Code"]
    assert "does not offer REQUIRETLS" in blocks["rfc822; s@stsok.test"]["Diagnostic-Code"]
    assert "CERTIFICATE_VERIFY_FAILED" in blocks["rfc822; s@sts.test"]["Diagnostic-Code"]
    # DANE verified that certificate (else: "no verified TLS session"); the hop lacked REQUIRETLS.
    assert "does not offer REQUIRETLS" in blocks["rfc822; x@good.dane.test"]["Diagnostic-Code"]
    assert "does not match its TLSA records" in blocks["rfc822; y@bad.dane.test"]["Diagnostic-Code"]
    assert notice.get_payload()[2].get_content_type() == "text/rfc822-headers"  # not the secret body
    # The notice has left the queue; the message stays, for c@stsfallback.test alone.
    queue = Queue(str(tmp_path / "queue"))
    wait_until(lambda: len(queue.ids()) == 1, 30, "only the message left in the queue")
    [pending] = queue.load(queue.ids()[0]).pending()
    assert pending.address == "c@stsfallback.test" and pending.reply.startswith("4.4.1 ")
    assert "CERTIFICATE_VERIFY_FAILED" in pending.reply
    # Only mx4 got the message, once per domain; no Postfix got it, in clear or otherwise.
    assert len([m for m in arrived() if m["Subject"] == "secret"]) == 2
    assert re.search(r"C: RCPT TO:<r@static\.test>", receiver.log())
    assert "u@unauth.test" not in receiver.log()
    for address in ("a@pref.test", "s@stsok.test", "x@good.dane.test", "y@bad.dane.test"):
        assert not any(b"Subject: secret" in m for m in internet.mx1.messages(address))
    assert not any(b"Subject: secret" in m for m in internet.mx2.messages("s@sts.test"))
    assert "MAIL FROM:<sender@late.test>" not in internet.mx1.log()
    assert "5.7.10" in server.log()
