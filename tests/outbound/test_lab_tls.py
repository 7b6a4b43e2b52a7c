"""End to end: TLS of the outbound queue: opportunistic STARTTLS, MTA-STS enforce, DANE, TLS-RPT."""

from __future__ import annotations

import datetime
import email
import gzip
import json
import subprocess
import sys

from outbound_helpers import message, queued, send, with_subject
from qpgevent.testing import wait_until


def received_over_tls(delivered: bytes) -> bool:
    # Postfix's smtpd_tls_received_header: "(using TLSv1.3 with cipher ...)" in its Received line.
    return b"using TLS" in delivered.split(b"\r\n\r\n", 1)[0].replace(b"\n", b"")


def test_starttls_is_used_when_offered(internet, start_mta):
    start_mta()
    send(internet, "sender@sender.test", ["a@pref.test"], message("encrypted"))
    [got] = with_subject(internet.mx1, "a@pref.test", "encrypted")
    assert received_over_tls(got)


def test_an_mta_sts_enforce_domain_with_a_bad_certificate_is_deferred_not_sent_in_clear(internet, start_mta, tmp_path):
    server = start_mta()
    send(internet, "sender@sender.test", ["s@sts.test", "s@stsok.test"], message("policy"))
    # stsok.test: its MX has a valid certificate for its name: delivered, over TLS.
    [got] = with_subject(internet.mx1, "s@stsok.test", "policy")
    assert received_over_tls(got)
    # sts.test: mx2's certificate names another host: never delivered, deferred.
    wait_until(lambda: server.log().count("deferred, next attempt") >= 2, 60, "two deferred attempts")
    assert "MTA-STS policy 1, mode enforce" in server.log()
    assert "CERTIFICATE_VERIFY_FAILED" in server.log()
    assert internet.mx2.messages("s@sts.test") == []
    assert len(queued(tmp_path / "queue")) == 1


def test_dane_delivers_to_a_matching_tlsa_record_and_not_to_a_mismatching_one(internet, start_mta, tmp_path):
    server = start_mta()
    send(internet, "sender@sender.test", ["x@good.dane.test", "y@bad.dane.test", "z@plain.dane.test"],
         message("dane"))
    [got] = with_subject(internet.mx1, "x@good.dane.test", "dane")
    assert received_over_tls(got)
    with_subject(internet.mx1, "z@plain.dane.test", "dane")  # signed zone, no TLSA for its MX: as usual
    wait_until(lambda: server.log().count("deferred, next attempt") >= 2, 60, "two deferred attempts")
    assert "does not match its TLSA records" in server.log()
    assert internet.mx1.messages("y@bad.dane.test") == []
    assert len(queued(tmp_path / "queue")) == 1


def test_dane_ta_delivers_under_the_anchor_and_defers_a_wrong_anchor_or_a_wrong_name(internet, start_mta, tmp_path):
    server = start_mta()
    send(internet, "sender@sender.test", ["t@ta.dane.test", "u@taspki.dane.test", "v@tabad.dane.test",
                                          "w@taname.dane.test"], message("dane-ta"))
    # 2 0 1 and 2 1 1 of the lab CA, which Postfix sends after mx1's certificate: delivered over TLS.
    for address in ("t@ta.dane.test", "u@taspki.dane.test"):
        [got] = with_subject(internet.mx1, address, "dane-ta")
        assert received_over_tls(got)
    # Another CA as anchor; the right anchor but a MX name the certificate lacks: deferred, twice.
    wait_until(lambda: server.log().count("deferred, next attempt") >= 2, 60, "two deferred attempts")
    log = server.log()
    assert "mxtabad.dane.test does not match its TLSA records (DANE): no certificate of the chain matches" in log
    assert "mxtaname.dane.test does not match its TLSA records (DANE): the certificate names" in log
    assert internet.mx1.messages("v@tabad.dane.test") == [] and internet.mx1.messages("w@taname.dane.test") == []
    assert len(queued(tmp_path / "queue")) == 1



def test_a_tlsa_record_changed_in_the_dns_is_seen_without_restarting_the_runner(internet, start_mta, tmp_path):
    wrong = [("TLSA", "3 1 1 " + "00" * 32)]
    internet.dns.set_records("dane.test", "_25._tcp.mxroll", wrong)
    server = start_mta()
    send(internet, "sender@sender.test", ["k@roll.dane.test"], message("rollover"))
    wait_until(lambda: "mxroll.dane.test does not match its TLSA records" in server.log(), 60, "the old record refused")
    assert internet.mx1.messages("k@roll.dane.test") == []
    # The new key published (a rollover): once the old answer's TTL (5 s) is over, the next retry delivers.
    internet.dns.set_records("dane.test", "_25._tcp.mxroll", [("TLSA", f"3 1 1 {internet.mx1_spki_sha256}")])
    [got] = with_subject(internet.mx1, "k@roll.dane.test", "rollover", timeout=60)
    assert received_over_tls(got)
    wait_until(lambda: queued(tmp_path / "queue") == [], 30, "the queue empty")

def tls_reports(internet, domain):
    """The TLS reports about ``domain`` in tlsrpt@sender.test's Maildir, decoded: [(mail, JSON)]."""
    found = []
    for mail in internet.mx1.messages("tlsrpt@sender.test"):
        report = email.message_from_bytes(mail)
        if report["TLS-Report-Domain"] == domain:
            [attachment] = [p for p in report.walk() if p.get_content_type() == "application/tlsrpt+gzip"]
            found.append((report, json.loads(gzip.decompress(attachment.get_payload(decode=True)))))
    return found


def test_tls_reports_count_failing_and_succeeding_sessions_and_reach_the_rua_mailbox_and_url(internet, start_mta):
    server = start_mta(tlsrpt="yes", tlsrpt_from="tls-reports@mta.lab.test", tlsrpt_organization="qpgevent lab")
    send(internet, "sender@sender.test", ["r@stsrpt.test", "r@stsweb.test", "y@bad.dane.test"], message("reported"))
    # stsrpt.test: mx2 (preference 10) shows a certificate for another name: refused; mx1 takes it, over TLS.
    [got] = with_subject(internet.mx1, "r@stsrpt.test", "reported")
    assert received_over_tls(got)
    # stsweb.test: its policy cannot be fetched (the web server's certificate lacks the name): no policy.
    with_subject(internet.mx1, "r@stsweb.test", "reported")
    wait_until(lambda: "does not match its TLSA records" in server.log(), 60, "bad.dane.test refused")
    done = subprocess.run([sys.executable, "-m", "qpgevent", "queue", "-c", server.ini, "tlsrpt"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr

    [(mail, data)] = wait_until(lambda: tls_reports(internet, "stsrpt.test"), 60, "the stsrpt.test report")
    assert mail.get_content_type() == "multipart/report" and mail.get_param("report-type") == "tlsrpt"
    assert mail["TLS-Report-Submitter"] == "mta.lab.test" and "Report Domain: stsrpt.test" in mail["Subject"]
    [attachment] = [p for p in mail.walk() if p.get_content_type() == "application/tlsrpt+gzip"]
    assert attachment.get_filename().startswith("mta.lab.test!stsrpt.test!")
    assert data["organization-name"] == "qpgevent lab" and data["contact-info"] == "tls-reports@mta.lab.test"
    start, end = (datetime.datetime.fromisoformat(data["date-range"][k].replace("Z", "+00:00"))
                  for k in ("start-datetime", "end-datetime"))
    assert start <= end
    [policy] = data["policies"]
    assert policy["policy"] == {"policy-type": "sts", "policy-domain": "stsrpt.test", "mx-host": ["*.lab.test"],
                                "policy-string": ["version: STSv1", "mode: enforce", "mx: *.lab.test",
                                                  "max_age: 86400"]}
    assert policy["summary"] == {"total-successful-session-count": 1, "total-failure-session-count": 1}
    [failure] = policy["failure-details"]
    assert failure["result-type"] == "certificate-host-mismatch" and failure["failed-session-count"] == 1
    assert failure["receiving-mx-hostname"] == "mx2.lab.test" and failure["receiving-ip"] == "198.18.0.22"
    # The same report POSTed to the https: rua, gzipped.
    [(_, path, content_type, body)] = wait_until(lambda: [p for p in internet.web.posted()
                                                          if p[0] == "mta-sts.stsrpt.test"], 60, "the POST")
    assert (path, content_type) == ("/tlsrpt", "application/tlsrpt+gzip")
    assert json.loads(gzip.decompress(body)) == data

    # stsweb.test: the failed fetch under "sts", the session that followed under no policy.
    [(_, data)] = wait_until(lambda: tls_reports(internet, "stsweb.test"), 60, "the stsweb.test report")
    policies = {p["policy"]["policy-type"]: p for p in data["policies"]}
    assert set(policies) == {"sts", "no-policy-found"}
    assert policies["no-policy-found"]["summary"] == {"total-successful-session-count": 1,
                                                      "total-failure-session-count": 0}
    [failure] = policies["sts"]["failure-details"]
    assert failure["result-type"] == "sts-webpki-invalid" and "mta-sts.stsweb.test" in failure["failure-reason-code"]

    # bad.dane.test (signed zone): its MX's TLSA record matches nothing; retried, so at least once.
    [(_, data)] = wait_until(lambda: tls_reports(internet, "bad.dane.test"), 60, "the bad.dane.test report")
    [policy] = data["policies"]
    assert policy["policy"] == {"policy-type": "tlsa", "policy-domain": "bad.dane.test",
                                "policy-string": ["3 1 1 " + "00" * 32], "mx-host": ["mxbad.dane.test"]}
    assert policy["summary"]["total-successful-session-count"] == 0
    assert {f["result-type"] for f in policy["failure-details"]} == {"tlsa-invalid"}
    assert policy["summary"]["total-failure-session-count"] >= 1
