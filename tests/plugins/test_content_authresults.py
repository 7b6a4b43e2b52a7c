"""qpgevent.authresults on real Transaction and Connection objects: one header, forged ones gone."""

from __future__ import annotations

from qpgevent import authresults
from qpgevent.connection import Connection
from qpgevent.transaction import Transaction


def transaction_with(header: bytes) -> Transaction:
    transaction = Transaction()
    transaction.write(header + b"\r\nbody\r\n")
    transaction.end_of_data()
    return transaction


def test_forged_fields_claiming_our_id_go_others_stay_in_place_byte_for_byte():
    header = (b"Authentication-Results: mx.example.test; spf=pass\r\n"
              b"From: a@b.test\r\n"
              b"Authentication-Results: (comment first) MX.Example.Test 1; dkim=pass\r\n"
              b"Authentication-Results: upstream.test;\r\n  spf=fail\r\n"
              b"Authentication-Results: mx.example.test.evil.test; dmarc=pass\r\n")
    transaction = transaction_with(header)
    transaction.headers.add("X-Other", "1")
    assert authresults.finish(transaction, Connection("192.0.2.1", 25), "mx.example.test") == 2
    assert transaction.headers.as_bytes() == (
        b"From: a@b.test\r\n"
        b"Authentication-Results: upstream.test;\r\n  spf=fail\r\n"
        b"Authentication-Results: mx.example.test.evil.test; dmarc=pass\r\n"
        b"X-Other: 1\r\n")


def test_one_header_with_every_result_in_order_iprev_first_values_quoted():
    transaction = transaction_with(b"From: a@b.test\r\n")
    connection = Connection("192.0.2.1", 25)
    connection.results.add("fcrdns", pass_="iprev", iprev="pass")
    authresults.record(transaction, "spf", "pass", smtp_mailfrom="a@b.test")
    authresults.record(transaction, "dkim", "fail", 'bad "sig"; really', header_d="b.test", header_s=None)
    authresults.record(transaction, "dmarc", "fail", header_from="b.test", policy_dmarc="reject")
    authresults.finish(transaction, connection, "mx.example.test")
    assert transaction.headers.as_bytes().split(b"\r\nFrom:")[0] == (
        b"Authentication-Results: mx.example.test;\r\n"
        b"\tiprev=pass policy.iprev=192.0.2.1;\r\n"
        b"\tspf=pass smtp.mailfrom=a@b.test;\r\n"
        b'\tdkim=fail reason="bad \\"sig\\"; really" header.d=b.test;\r\n'
        b"\tdmarc=fail header.from=b.test policy.dmarc=reject")


def test_nothing_recorded_adds_nothing():
    transaction = transaction_with(b"From: a@b.test\r\n")
    assert authresults.finish(transaction, Connection("192.0.2.1", 25), "mx.example.test") == 0
    assert transaction.headers.as_bytes() == b"From: a@b.test\r\n"


def test_authserv_id_ignores_comments_and_version():
    assert authresults.authserv_id("(x) Mx.Example.Test 1 ; spf=pass") == "mx.example.test"
    assert authresults.authserv_id("") == ""
