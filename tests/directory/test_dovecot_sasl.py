"""auth/dovecot relaying the mechanisms whose challenges Dovecot makes (CRAM-MD5, SCRAM-*),
end to end: a real Dovecot auth service, the real server, a Python client over STARTTLS
(smtplib's CRAM-MD5; SCRAM's client side written here with hashlib and hmac)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import smtplib

import pytest

from qpgevent.testing import maildir_messages

from directory_daemons import DOVECOT_USERS, LoopbackDovecot

DANA, DANA_PW = "dana@example.test", DOVECOT_USERS["dana@example.test"]
MECHANISMS = "plain login cram-md5 scram-sha-1 scram-sha-256"


@pytest.fixture
def scram_dovecot():
    with LoopbackDovecot(DOVECOT_USERS, mechanisms=MECHANISMS) as daemon:
        yield daemon


def plugins(socket: str, mechanisms: str = "CRAM-MD5, SCRAM-SHA-1, SCRAM-SHA-256") -> str:
    return (f"[[auth/dovecot]]\n  socket = {socket}\n  mechanisms = {mechanisms}\n"
            "[[rcpt_ok]]\n  domains = example.test\n[[queue/maildir]]\n  path = Maildir\n")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def connected(server) -> smtplib.SMTP:
    client = server.smtp(timeout=30)
    client.starttls(context=server.certs.client_context())
    client.ehlo()
    return client


def scram(client: smtplib.SMTP, mechanism: str, user: str, password: str, initial: bool = True) -> tuple[int, bytes]:
    """RFC 5802 from the client's side: the final reply; a 235 only after the server proved
    it knows the password too (its signature, checked here)."""
    digest = {"SCRAM-SHA-1": hashlib.sha1, "SCRAM-SHA-256": hashlib.sha256}[mechanism]
    nonce = b64(secrets.token_bytes(18))
    first_bare = f"n={user},r={nonce}"
    if initial:
        code, text = client.docmd("AUTH", f"{mechanism} {b64(('n,,' + first_bare).encode())}")
    else:
        code, text = client.docmd("AUTH", mechanism)
        assert (code, text) == (334, b"")  # the client speaks first: an empty challenge
        code, text = client.docmd(b64(("n,," + first_bare).encode()))
    assert code == 334, (code, text)
    server_first = base64.b64decode(text).decode()
    fields = dict(item.split("=", 1) for item in server_first.split(","))
    assert fields["r"].startswith(nonce) and len(fields["r"]) > len(nonce)
    salted = hashlib.pbkdf2_hmac(digest().name, password.encode(), base64.b64decode(fields["s"]), int(fields["i"]))
    client_key = hmac.new(salted, b"Client Key", digest).digest()
    without_proof = f"c=biws,r={fields['r']}"
    message = f"{first_bare},{server_first},{without_proof}".encode()
    signature = hmac.new(digest(client_key).digest(), message, digest).digest()
    proof = bytes(a ^ b for a, b in zip(client_key, signature))
    code, text = client.docmd(b64(f"{without_proof},p={b64(proof)}".encode()))
    if code != 334:
        assert code != 235, "235 without the server's signature"
        return code, text
    server_key = hmac.new(salted, b"Server Key", digest).digest()
    assert base64.b64decode(text) == b"v=" + base64.b64encode(hmac.new(server_key, message, digest).digest())
    return client.docmd("")  # RFC 4954: success data is a 334, answered with an empty line


def cram_md5(server, user: str, password: str) -> tuple[int, bytes]:
    with connected(server) as client:
        client.user, client.password = user, password
        try:
            return client.auth("CRAM-MD5", client.auth_cram_md5)
        except smtplib.SMTPAuthenticationError as error:
            return error.smtp_code, error.smtp_error


def test_dovecot_offers_the_challenge_mechanisms_with_the_test_passdb(tls_server, scram_dovecot):
    server = tls_server(plugins(scram_dovecot.inet, "all"))
    with connected(server) as client:
        assert client.esmtp_features["auth"].split() == ["PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-1",
                                                          "SCRAM-SHA-256"]


@pytest.mark.parametrize("mechanism, initial", [("SCRAM-SHA-256", True), ("SCRAM-SHA-1", False)])
def test_scram_through_dovecot_authenticates_and_sends(tls_server, scram_dovecot, mechanism, initial):
    server = tls_server(plugins(scram_dovecot.client_socket))
    with connected(server) as client:
        assert scram(client, mechanism, DANA, DANA_PW, initial) == (235, b"2.7.0 Authentication successful")
        client.sendmail(DANA, ["x@example.test"], b"Subject: hi\r\n\r\nvia SCRAM\r\n")
    message = next(iter(maildir_messages(server.maildir).values()))
    assert b"(authenticated as dana@example.test)" in message


def test_scram_wrong_password_gets_535(tls_server, scram_dovecot):
    server = tls_server(plugins(scram_dovecot.inet))
    with connected(server) as client:
        assert scram(client, "SCRAM-SHA-256", DANA, "wrong")[0] == 535
        assert scram(client, "SCRAM-SHA-256", DANA, DANA_PW)[0] == 235  # the same session, a new exchange


def test_cancelled_exchange_then_a_new_one(tls_server, scram_dovecot):
    server = tls_server(plugins(scram_dovecot.inet))
    with connected(server) as client:
        first = b64(f"n,,n={DANA},r=abcdefgh".encode())
        assert client.docmd("AUTH", f"SCRAM-SHA-256 {first}")[0] == 334
        assert client.docmd("*")[0] == 501
        assert scram(client, "SCRAM-SHA-256", DANA, DANA_PW)[0] == 235


def test_cram_md5_through_dovecot(tls_server, scram_dovecot):
    server = tls_server(plugins(scram_dovecot.inet))
    assert cram_md5(server, DANA, DANA_PW)[0] == 235
    assert cram_md5(server, DANA, "wrong")[0] == 535
    assert cram_md5(server, "nobody@example.test", "x")[0] == 535


def test_dovecot_down_gets_454_for_relayed_mechanisms(tls_server, scram_dovecot):
    server = tls_server(plugins(scram_dovecot.inet))
    assert cram_md5(server, DANA, DANA_PW)[0] == 235
    scram_dovecot.stop()
    assert cram_md5(server, DANA, DANA_PW) == (454, b"4.7.0 Temporary authentication failure")
    with connected(server) as client:
        code, text = client.docmd("AUTH", f"SCRAM-SHA-256 {b64(f'n,,n={DANA},r=abcdefgh'.encode())}")
        assert (code, text) == (454, b"4.7.0 Temporary authentication failure")
    scram_dovecot.start()
    assert cram_md5(server, DANA, DANA_PW)[0] == 235


def test_a_mechanism_dovecot_does_not_offer_is_a_454(tls_server, dovecot):
    server = tls_server(plugins(dovecot.inet, "CRAM-MD5"))  # this Dovecot: plain login only
    assert cram_md5(server, DANA, DANA_PW)[0] == 454


def test_dovecot_hung_between_steps_gets_454_after_the_timeout(tls_server, scram_dovecot):
    server = tls_server(plugins(scram_dovecot.inet).replace("  mechanisms", "  lookup_timeout = 2\n  mechanisms", 1))
    with connected(server) as client:
        assert client.docmd("AUTH", "CRAM-MD5")[0] == 334  # Dovecot's challenge, relayed
        scram_dovecot.pause()  # hangs with the exchange half done
        try:
            assert client.docmd(b64(f"{DANA} {'0' * 32}".encode())) == (
                454, b"4.7.0 Temporary authentication failure")
        finally:
            scram_dovecot.resume()
        assert scram(client, "SCRAM-SHA-256", DANA, DANA_PW)[0] == 235  # the session goes on
