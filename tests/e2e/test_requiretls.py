"""REQUIRETLS (RFC 8689) black-box: offered only inside TLS, refused outside it, and a
flagged message forwarded by queue/smtp_forward only to a next hop that offers it over
verified TLS: a real Postfix (which does not offer REQUIRETLS) never gets it."""

from __future__ import annotations

import json
import smtplib

import pytest

from qpgevent.testing.mta import Postfix, make_certificates
from tls_helpers import Certs

MESSAGE = b"Subject: secret\r\nFrom: sender@client.test\r\nTo: bob@example.test\r\n\r\nhush\r\n"


def send_flagged(server, certs: Certs) -> tuple[int, bytes]:
    """One message with REQUIRETLS, inside TLS: the reply to its DATA."""
    with smtplib.SMTP(server.host, server.port, local_hostname="client.test", timeout=60) as client:
        client.starttls(context=certs.client_context())
        client.ehlo()
        assert client.mail("sender@client.test", ["REQUIRETLS"])[0] == 250
        assert client.rcpt("bob@example.test")[0] == 250
        return client.data(MESSAGE)


@pytest.fixture
def postfix(tmp_path):
    ca, cert, key = make_certificates(tmp_path / "postfix-tls")
    instance = Postfix(["bob@example.test"], tls=(cert, key), main={"debug_peer_list": "127.0.0.0/8"})
    instance.ca = ca
    try:
        yield instance.start()
    finally:
        instance.cleanup()


@pytest.fixture
def server(make_server, tmp_path, postfix):
    certs = Certs(tmp_path)
    certs.issue()
    plugins = (f"[[queue/smtp_forward]]\n  routes = example.test:localhost:{postfix.port}\n"
               f"  tls_ca_file = {postfix.ca}\n  starttls = required\n"
               "[[rcpt_ok]]\n  domains = example.test\n")
    instance = make_server(plugins, tls_certificate="server.pem")
    instance.certs = certs
    return instance


def test_requiretls_offered_only_inside_tls_and_refused_outside(server):
    with smtplib.SMTP(server.host, server.port, local_hostname="client.test", timeout=60) as client:
        client.ehlo()
        assert not client.has_extn("requiretls")
        assert client.mail("sender@client.test", ["REQUIRETLS"]) == (
            530, b"5.7.10 REQUIRETLS needs a TLS session: STARTTLS first")
        client.starttls(context=server.certs.client_context())
        client.ehlo()
        assert client.has_extn("requiretls")
        assert client.mail("sender@client.test", ["REQUIRETLS=yes"])[0] == 501  # a bare keyword
        assert client.mail("sender@client.test", ["REQUIRETLS"])[0] == 250


def test_requiretls_message_is_refused_not_sent_to_a_hop_without_requiretls(server, postfix):
    with smtplib.SMTP(server.host, server.port, local_hostname="client.test", timeout=60) as client:
        client.starttls(context=server.certs.client_context())
        client.ehlo()
        assert client.mail("sender@client.test", ["REQUIRETLS"])[0] == 250
        assert client.rcpt("bob@example.test")[0] == 250
        code, text = client.data(MESSAGE)
        assert code == 554 and text.startswith(b"5.7.10 REQUIRETLS: ") and b"does not offer REQUIRETLS" in text
        # The same message without the flag goes through the same verified TLS route: so the
        # refusal was REQUIRETLS's, and Postfix saw no MAIL for the flagged one.
        assert client.mail("sender@client.test")[0] == 250
        assert client.rcpt("bob@example.test")[0] == 250
        assert client.data(MESSAGE)[0] == 250
    assert len(postfix.wait_for_messages("bob@example.test", 1)) == 1
    assert postfix.log().count("MAIL FROM:<sender@client.test>") == 1, postfix.log()
    assert "REQUIRETLS" not in postfix.log()


def test_the_outbound_queue_keeps_the_requiretls_flag_with_the_message(make_server, tmp_path):
    """Its runner insists on verified TLS and REQUIRETLS per message (tests/outbound/test_lab_dsn.py)."""
    certs = Certs(tmp_path)
    certs.issue()
    server = make_server(f"[[rcpt_ok]]\n  domains = example.test\n[[queue/outbound]]\n  queue_dir = {tmp_path / 'q'}\n",
                         tls_certificate="server.pem")
    code, text = send_flagged(server, certs)
    assert code == 250 and text.startswith(b"2.0.0 queued as "), (code, text)
    [envelope] = list((tmp_path / "q" / "env").iterdir())
    assert json.loads(envelope.read_text())["requiretls"] is True


def test_requiretls_message_goes_to_a_qpgevent_next_hop_over_verified_tls(make_server, tmp_path):
    """qpgevent itself offers REQUIRETLS inside TLS, so the flagged message goes through;
    the next hop offers REQUIRETLS only inside TLS: that it accepted the flag shows TLS."""
    certs = Certs(tmp_path)
    certs.issue()
    hop = make_server("[[rcpt_ok]]\n  domains = example.test\n[[queue/maildir]]\n  path = Maildir\n",
                      tls_certificate="server.pem")
    relay = make_server(f"[[queue/smtp_forward]]\n  routes = example.test:localhost:{hop.port}\n"
                        f"  tls_ca_file = {certs.ca_path}\n[[rcpt_ok]]\n  domains = example.test\n",
                        tls_certificate="server.pem")
    assert send_flagged(relay, certs)[0] == 250
    [delivered] = list((tmp_path / "Maildir" / "new").iterdir())
    assert b"ESMTPS" in delivered.read_bytes() and delivered.read_bytes().rstrip().endswith(b"hush")
    # The same hop, TLS without verification: refused, and nothing more delivered.
    unverified = make_server(f"[[queue/smtp_forward]]\n  routes = example.test:localhost:{hop.port}\n"
                             "  tls_verify = no\n[[rcpt_ok]]\n  domains = example.test\n",
                             tls_certificate="server.pem")
    code, text = send_flagged(unverified, certs)
    assert code == 554 and b"5.7.10 REQUIRETLS: " in text and b"no verified TLS session" in text, text
    assert len(list((tmp_path / "Maildir" / "new").iterdir())) == 1
