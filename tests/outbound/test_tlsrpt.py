"""TLS-RPT (RFC 8460) on its own: the record, the tally, the report, and the periods on disk.

The reports go through real DNS (NSD on loopback) and into a real queue folder; the lab
test (test_lab_tls.py) sends one through Postfix and over HTTPS end to end.
"""

from __future__ import annotations

import email
import gzip
import json
import os
import subprocess
import sys

import pytest
from gevent.event import Event
from gevent.server import StreamServer

from outbound_helpers import message
from qpgevent import dns
from qpgevent.backends.delivery import Options, Runner
from qpgevent.backends.tlsrpt import TlsReports
from qpgevent.core.tlsrpt import Policy, Tally, parse_record, report, result_of_verify_code
from qpgevent.outqueue import Queue, Recipient, State
from qpgevent.smtp_client import ClientOptions
from qpgevent.testing import plugin_section, write_ini
from qpgevent.testing.dns import LoopbackDns
from qpgevent.testing.mta import Postfix
from qpgevent.tls_policy import TlsPolicies

STS = Policy("rpt.test", "sts", ("version: STSv1", "mode: enforce", "mx: *.rpt.test", "max_age: 86400"), ("*.rpt.test",))
DAY = 86400.0


def in_process(function, *args, **kwargs):
    return function(*args, **kwargs)


def test_the_record_names_mailto_and_https_uris_and_only_one_tlsrptv1_record_counts():
    assert parse_record(["v=TLSRPTv1; rua=mailto:a@x.test, https://r.x.test/in,ftp://no"]) == [
        "mailto:a@x.test", "https://r.x.test/in"]
    assert parse_record(["v=spf1 -all", "v=TLSRPTv1;rua=mailto:a@x.test"]) == ["mailto:a@x.test"]
    assert parse_record(["v=TLSRPTv1; rua=mailto:a@x.test", "v=TLSRPTv1; rua=mailto:b@x.test"]) == []
    assert parse_record(["v=TLSRPTv2; rua=mailto:a@x.test"]) == [] and parse_record([]) == []


def test_certificate_errors_map_to_rfc8460_result_types():
    assert result_of_verify_code(62) == "certificate-host-mismatch"
    assert result_of_verify_code(10) == "certificate-expired"
    assert result_of_verify_code(20) == "certificate-not-trusted"
    assert result_of_verify_code(None) == "validation-failure"


def test_the_report_sums_sessions_per_policy_and_groups_failures():
    tally = Tally(DAY * 10)
    for _ in range(3):
        tally.count(STS, "success")
    tally.count(STS, "certificate-expired", "mx1.rpt.test", "192.0.2.1", "expired")
    tally.count(STS, "certificate-expired", "mx1.rpt.test", "192.0.2.1", "expired")
    tally.count(STS, "starttls-not-supported", "mx2.rpt.test", "192.0.2.2")
    tally.count(Policy("other.test"), "success")
    data = report(tally, DAY * 11 - 1, "rpt.test", "Org", "tls@me.test", "id-1")
    assert data["organization-name"] == "Org" and data["report-id"] == "id-1"
    assert data["date-range"] == {"start-datetime": "1970-01-11T00:00:00Z", "end-datetime": "1970-01-11T23:59:59Z"}
    [policy] = data["policies"]
    assert policy["policy"]["policy-type"] == "sts" and policy["policy"]["mx-host"] == ["*.rpt.test"]
    assert policy["summary"] == {"total-successful-session-count": 3, "total-failure-session-count": 3}
    assert policy["failure-details"] == [
        {"result-type": "certificate-expired", "receiving-mx-hostname": "mx1.rpt.test", "receiving-ip": "192.0.2.1",
         "failure-reason-code": "expired", "failed-session-count": 2},
        {"result-type": "starttls-not-supported", "receiving-mx-hostname": "mx2.rpt.test",
         "receiving-ip": "192.0.2.2", "failed-session-count": 1}]
    [other] = report(tally, DAY * 11 - 1, "other.test", "Org", "c", "id-2")["policies"]
    assert other["policy"] == {"policy-type": "no-policy-found", "policy-domain": "other.test"}


@pytest.fixture(scope="module")
def resolver():
    zones = {"rpt.test": {"_smtp._tls": [("TXT", '"v=TLSRPTv1; rua=mailto:tls@reports.test"')],
                          "@": [("MX", "10 mx.rpt.test.")], "mx": [("A", "127.0.0.1")]},
             "quiet.test": {"@": [("MX", "10 mx.rpt.test.")]}}
    with LoopbackDns(zones, servfail_zones=("broken.test",)) as server:
        yield dns.Resolver(["127.0.0.1"], port=server.port, timeout=3)


def reports_in(tmp_path, **options):
    queue = Queue(str(tmp_path / "queue"), fsync=False)
    return queue, TlsReports(str(tmp_path / "queue" / "tlsrpt"), queue, me="mta.test", **options)


def test_a_finished_period_is_mailed_to_the_rua_and_forgotten(tmp_path, resolver):
    queue, reports = reports_in(tmp_path, sender="tls@mta.test")
    reports.tally = Tally(DAY * 20)
    reports.count(STS, "success")
    reports.count(STS, "certificate-host-mismatch", "mx.rpt.test", "127.0.0.1", "names elsewhere")
    with dns.use(resolver):
        assert reports.turn(DAY * 20 + 5, in_process) == []  # the day is not over: counted, kept on disk
        assert json.loads((tmp_path / "queue" / "tlsrpt" / "current.json").read_text())["policies"]
        [report_id] = reports.turn(DAY * 21 + 1, in_process)
    envelope = queue.load(report_id)
    assert envelope.sender == "tls@mta.test" and envelope.kind == "tlsrpt"
    assert [r.address for r in envelope.recipients] == ["tls@reports.test"]
    mail = email.message_from_bytes(b"".join(queue.message_chunks(report_id)))
    assert mail["TLS-Report-Domain"] == "rpt.test" and mail["TLS-Report-Submitter"] == "mta.test"
    [part] = [p for p in mail.walk() if p.get_content_type() == "application/tlsrpt+gzip"]
    assert part.get_filename() == f"mta.test!rpt.test!{int(DAY * 20)}!{int(DAY * 21)}!{int(DAY * 20)}-{int(DAY * 21)}" \
                                  ".rpt.test.json.gz"
    data = json.loads(gzip.decompress(part.get_payload(decode=True)))
    assert data["date-range"]["end-datetime"] == "1970-01-21T23:59:59Z"
    assert data["policies"][0]["summary"] == {"total-successful-session-count": 1, "total-failure-session-count": 1}
    assert [n for n in os.listdir(tmp_path / "queue" / "tlsrpt") if n.startswith("closed-")] == []
    assert reports.tally.start == DAY * 21 and reports.tally.policies == {}


def test_counts_survive_a_restart_and_a_domain_without_a_record_gets_no_report(tmp_path, resolver):
    queue, reports = reports_in(tmp_path)
    reports.tally = Tally(DAY * 30)
    reports.count(Policy("quiet.test"), "success")
    reports.flush()
    queue, again = reports_in(tmp_path)  # the runner restarted
    assert again.tally.start == DAY * 30 and again.tally.domains() == ["quiet.test"]
    with dns.use(resolver):
        assert again.turn(DAY * 31, in_process) == []
    assert queue.ids() == []
    assert [n for n in os.listdir(tmp_path / "queue" / "tlsrpt") if n.startswith("closed-")] == []


def test_a_domain_whose_record_cannot_be_looked_up_is_kept_for_later(tmp_path, resolver):
    queue, reports = reports_in(tmp_path)
    reports.tally = Tally(DAY * 40)
    reports.count(Policy("broken.test"), "success")
    reports.count(STS, "success")
    with dns.use(resolver):
        [report_id] = reports.turn(DAY * 41, in_process)  # rpt.test's goes; broken.test's waits
        [closed] = [n for n in os.listdir(tmp_path / "queue" / "tlsrpt") if n.startswith("closed-")]
        assert json.loads((tmp_path / "queue" / "tlsrpt" / closed).read_text())["sent"] == ["rpt.test"]
        assert reports.turn(DAY * 41 + 10, in_process) == []  # not retried at once
        assert closed in os.listdir(tmp_path / "queue" / "tlsrpt")
    assert queue.ids() == [report_id]


def test_asking_ends_the_period_now(tmp_path, resolver):
    queue, reports = reports_in(tmp_path)
    reports.tally = Tally(DAY * 50)
    reports.count(STS, "success")
    reports.ask()
    assert reports.due(DAY * 50 + 60)
    with dns.use(resolver):
        [report_id] = reports.turn(DAY * 50 + 60, in_process)
    assert reports.tally.start == DAY * 50 + 60 and not reports.asked
    mail = email.message_from_bytes(b"".join(queue.message_chunks(report_id)))
    [part] = [p for p in mail.walk() if p.get_content_type() == "application/tlsrpt+gzip"]
    assert json.loads(gzip.decompress(part.get_payload(decode=True)))["date-range"]["end-datetime"] == \
        "1970-02-20T00:01:00Z"


def test_a_required_starttls_not_offered_is_counted_as_starttls_not_supported(tmp_path, resolver):
    postfix = Postfix(["a@rpt.test"]).start()  # no TLS configured: no STARTTLS offered
    try:
        queue, reports = reports_in(tmp_path)
        client = ClientOptions(helo="mta.test", connect_timeout=5, command_timeout=10)
        tls = TlsPolicies(client, {"rpt.test": "encrypt"}, "may", mta_sts=False, dane=False, reports=reports)
        runner = Runner(queue, Options(me="mta.test", port=postfix.port, client=client, tls=tls,
                                       minimal_backoff=60, maximal_backoff=60))
        envelope = queue.enqueue("s@mta.test", [Recipient("a@rpt.test")], [message("needs tls")])
        with dns.use(resolver):
            runner.attempt(envelope.id)
        assert queue.load(envelope.id).recipients[0].state is State.PENDING
        [entry] = reports.tally.policies.values()
        assert entry["policy"] == {"policy-type": "no-policy-found", "policy-domain": "rpt.test"}
        assert entry["success"] == 0
        [(detail, count)] = entry["failures"].items()
        assert json.loads(detail)[:3] == ["starttls-not-supported", "mx.rpt.test", "127.0.0.1"] and count == 1
    finally:
        postfix.cleanup()


def test_an_https_rua_that_never_answers_is_given_up_after_the_post_timeout(tmp_path, resolver):
    released = Event()  # the peer says nothing until the test ends: only our timeout can end the POST
    silent = StreamServer(("127.0.0.1", 0), lambda sock, _: released.wait())
    silent.start()
    try:
        _, reports = reports_in(tmp_path)
        reports.post_timeout = 0.5
        with dns.use(resolver):
            assert reports._post(f"https://mx.rpt.test:{silent.server_port}/in", b"report", "rpt.test") is False
    finally:
        released.set()
        silent.stop(timeout=1)


@pytest.mark.parametrize("tlsrpt, error", [("no", "tlsrpt is off"), ("yes", "no queue runner is running")])
def test_the_tlsrpt_command_says_when_it_cannot_be_done(tmp_path, tlsrpt, error):
    plugins = "[[rcpt_ok]]\n" + plugin_section("queue/outbound", queue_dir=str(tmp_path / "queue"), tlsrpt=tlsrpt)
    ini = write_ini(tmp_path, plugins=plugins)
    done = subprocess.run([sys.executable, "-m", "qpgevent", "queue", "-c", str(ini), "tlsrpt"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and error in done.stderr


def test_policies_beyond_the_limit_are_not_counted_until_the_next_period(tmp_path, resolver):
    queue, reports = reports_in(tmp_path)
    reports.max_policies = 2
    reports.tally = Tally(DAY * 60)
    for domain in ("a.rpt.test", "b.rpt.test", "c.rpt.test"):
        reports.count(Policy(domain), "success")
    reports.count(Policy("a.rpt.test"), "starttls-not-supported", "mx.rpt.test")  # a policy already counted: counted
    assert reports.tally.domains() == ["a.rpt.test", "b.rpt.test"] and reports.full
    [entry] = [e for e in reports.tally.policies.values() if e["policy"]["policy-domain"] == "a.rpt.test"]
    assert entry["success"] == 1 and sum(entry["failures"].values()) == 1
    with dns.use(resolver):
        reports.turn(DAY * 61, in_process)
    reports.count(Policy("c.rpt.test"), "success")
    assert reports.tally.domains() == ["c.rpt.test"] and not reports.full
