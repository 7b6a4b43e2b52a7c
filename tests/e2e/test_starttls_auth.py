"""STARTTLS (RFC 3207), SMTPS (RFC 8314) and AUTH (RFC 4954) with real clients.

smtplib, swaks and ``openssl s_client`` against the real server on loopback; the
certificates come from a throwaway trustme CA made in each test.
"""

from __future__ import annotations

import base64
import logging
import smtplib
import socket
import ssl
import subprocess
import sys
import time

import gevent
import pytest

from qpgevent.testing import maildir_messages

from tls_helpers import AUTH_PLUGINS, ROOT, USERS, Certs, peer_serial, write_users

ALICE, ALICE_PW = "alice@example.test", USERS["alice@example.test"]
BOB, BOB_PW = "bob@example.test", USERS["bob@example.test"]


@pytest.fixture
def certs(tmp_path):
    return Certs(tmp_path)


@pytest.fixture
def tls_server(make_server, tmp_path, certs):
    """``tls_server(plugins=AUTH_PLUGINS, **settings)``: a server with a certificate and users."""
    write_users(tmp_path)
    certs.issue()

    def make(plugins: str = AUTH_PLUGINS, **settings):
        settings.setdefault("tls_certificate", "server.pem")
        server = make_server(plugins, **settings)
        server.certs = certs
        return server
    return make


def ehlo_keywords(client: smtplib.SMTP) -> set[str]:
    code, _ = client.ehlo()
    assert code == 250
    return set(client.esmtp_features)


def test_starttls_then_login_delivers_with_esmtpsa(tls_server):
    server = tls_server()
    with server.smtp(timeout=10) as client:
        before = ehlo_keywords(client)
        assert "starttls" in before and "auth" not in before  # AUTH only inside TLS
        client.starttls(context=server.certs.client_context())
        after = ehlo_keywords(client)
        assert "starttls" not in after and client.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
        client.login(ALICE, ALICE_PW)
        client.sendmail(ALICE, ["x@example.test"], b"Subject: hi\r\n\r\nover TLS\r\n")
    message = next(iter(maildir_messages(server.maildir).values()))
    received = message.split(b"\r\n\r\n")[0].decode()
    assert "with ESMTPSA (authenticated as alice@example.test)" in received


def test_login_mechanism_and_wrong_password(tls_server):
    server = tls_server(auth_failure_delay=0)
    with server.smtp(timeout=10) as client:
        client.starttls(context=server.certs.client_context())
        client.ehlo()
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            client.login(ALICE, "wrong")
        assert refused.value.smtp_code == 535
        client.user, client.password = BOB, BOB_PW
        code, text = client.auth("LOGIN", client.auth_login, initial_response_ok=False)
        assert (code, text[:5]) == (235, b"2.7.0")


def test_swaks_tls_auth_plain_and_login(tls_server):
    server = tls_server()
    for mechanism in ("PLAIN", "LOGIN"):
        result = subprocess.run(
            ["swaks", "--server", f"{server.host}:{server.port}", "--tls", "--tls-verify", "--tls-ca-path",
             str(server.certs.ca_path), "--auth", mechanism,
             "--auth-user", ALICE, "--auth-password", ALICE_PW, "--from", ALICE, "--to", "x@example.test",
             "--helo", "client.example.test", "--timeout", "10"],
            capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "<~  235 2.7.0" in result.stdout
    assert len(maildir_messages(server.maildir)) == 2


def test_openssl_s_client_starttls_verifies_the_certificate(tls_server):
    server = tls_server()
    result = subprocess.run(
        ["openssl", "s_client", "-connect", f"{server.host}:{server.port}", "-starttls", "smtp",
         "-CAfile", str(server.certs.ca_path), "-verify_return_error", "-verify_hostname", "mx.example.test",
         "-servername", "mx.example.test", "-ign_eof"],
        input="EHLO client.example.test\r\nQUIT\r\n", capture_output=True, text=True, timeout=30)
    assert "Verify return code: 0 (ok)" in result.stdout, result.stdout + result.stderr
    assert "250-AUTH PLAIN LOGIN" in result.stdout or "250 AUTH PLAIN LOGIN" in result.stdout
    assert "221 2.0.0" in result.stdout


def _read_reply(sock: socket.socket) -> bytes:
    data = b""
    while True:
        chunk = sock.recv(4096)
        assert chunk, data
        data += chunk
        last = data.rstrip(b"\r\n").split(b"\r\n")[-1]
        if data.endswith(b"\r\n") and last[3:4] == b" ":
            return data


def test_plaintext_pipelined_after_starttls_is_never_acted_on(tls_server):
    """CVE-2011-0411: 'STARTTLS\\r\\nMAIL FROM:<x@y>\\r\\n' in one packet."""
    server = tls_server()
    sock = socket.create_connection((server.host, server.port), timeout=10)
    assert _read_reply(sock).startswith(b"220 ")
    sock.sendall(b"EHLO client.example.test\r\n")
    _read_reply(sock)
    sock.sendall(b"STARTTLS\r\nMAIL FROM:<x@y.test>\r\n")
    assert _read_reply(sock) == b"220 2.0.0 Ready to start TLS\r\n"
    tls = server.certs.client_context().wrap_socket(sock, server_hostname="mx.example.test")
    # Were the MAIL still buffered, its reply (503: hello first, or 250) would come first.
    tls.sendall(b"NOOP\r\n")
    assert _read_reply(tls) == b"250 2.0.0 OK\r\n"
    tls.sendall(b"EHLO client.example.test\r\n")
    _read_reply(tls)
    tls.sendall(b"RCPT TO:<x@example.test>\r\n")  # no MAIL was ever accepted
    assert _read_reply(tls).startswith(b"503 5.5.1 MAIL first")
    tls.sendall(b"QUIT\r\n")
    assert _read_reply(tls).startswith(b"221")
    tls.close()


def test_certificates_are_reloaded_without_restart(tls_server):
    server = tls_server(tls_reload_check=0)
    context = server.certs.client_context()

    def serial() -> int:
        with server.smtp(timeout=10) as client:
            client.starttls(context=context)
            return peer_serial(client.sock)
    first = serial()
    assert serial() == first
    server.certs.issue()  # a renewal: new file renamed over the old one
    assert serial() != first


def test_sni_picks_the_certificate_of_the_name(tls_server, certs):
    certs.issue("other.pem", "other.example.test")
    server = tls_server(tls_sni="other.example.test=other.pem")
    context = certs.client_context()
    for name in ("other.example.test", "mx.example.test"):
        raw = socket.create_connection((server.host, server.port), timeout=10)
        _read_reply(raw)
        raw.sendall(b"EHLO c.test\r\n")
        _read_reply(raw)
        raw.sendall(b"STARTTLS\r\n")
        _read_reply(raw)
        tls = context.wrap_socket(raw, server_hostname=name)  # verifies the name: the right cert
        tls.close()


def test_failed_handshake_ends_the_session_not_the_server(tls_server, caplog):
    server = tls_server(tls_handshake_timeout=0.5)
    sock = socket.create_connection((server.host, server.port), timeout=10)
    _read_reply(sock)
    sock.sendall(b"EHLO c.test\r\n")
    _read_reply(sock)
    sock.sendall(b"STARTTLS\r\n")
    _read_reply(sock)
    with caplog.at_level(logging.INFO):
        sock.sendall(b"this is no TLS client hello\r\n" * 4)
        sock.settimeout(5)
        try:
            while sock.recv(4096):
                pass
        except ConnectionResetError:
            pass  # the server closed on unread input: RST
        sock.close()
        quiet = socket.create_connection((server.host, server.port), timeout=10)  # times out
        _read_reply(quiet)
        quiet.sendall(b"EHLO c.test\r\n")
        _read_reply(quiet)
        quiet.sendall(b"STARTTLS\r\n")
        _read_reply(quiet)
        quiet.settimeout(5)
        assert quiet.recv(100) == b""
        quiet.close()
    failures = [r.getMessage() for r in caplog.records if "TLS handshake failed" in r.getMessage()]
    assert len(failures) == 2 and "no handshake within 0.5s" in failures[1], failures
    with server.smtp(timeout=10) as client:
        client.starttls(context=server.certs.client_context())
        assert client.noop()[0] == 250


def test_smtps_listener_is_tls_from_the_first_octet(tls_server):
    server = tls_server(listen="127.0.0.1:0, 127.0.0.1:0/smtps")
    host, port = server.server.addresses[1]
    with smtplib.SMTP_SSL(host, port, local_hostname="c.test", context=server.certs.client_context(),
                          timeout=10) as client:
        keywords = ehlo_keywords(client)
        assert "starttls" not in keywords and "auth" in keywords
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:  # smtps is submission: AUTH first
            client.sendmail(ALICE, ["x@example.test"], b"\r\nx\r\n")
        assert refused.value.smtp_code == 530
        client.login(ALICE, ALICE_PW)
        client.sendmail(ALICE, ["x@example.test"], b"Subject: smtps\r\n\r\nx\r\n")
    message = next(iter(maildir_messages(server.maildir).values()))
    assert b"with ESMTPSA" in message


def test_submission_policy_auth_first_and_own_senders(tls_server, tmp_path):
    (tmp_path / "senders").write_text("alice@example.test  alice@example.test @alice.test  # hers\n")
    server = tls_server(listen="127.0.0.1:0/submission", auth_senders="senders")
    with server.smtp(timeout=10) as client:
        client.starttls(context=server.certs.client_context())
        client.ehlo()
        assert client.mail(ALICE)[0] == 530
        client.login(ALICE, ALICE_PW)
        code, text = client.mail("bob@example.test")
        assert (code, text[:5]) == (553, b"5.7.1")
        assert client.mail("anything@alice.test")[0] == 250
        client.rset()
        assert client.mail("")[0] == 250  # the null sender (MDNs, DSNs)
        client.rset()
        assert client.mail(ALICE, ["AUTH=<>"])[0] == 250  # RFC 4954 5
    with server.smtp(timeout=10) as client:  # bob is not in the file: his own address only
        client.starttls(context=server.certs.client_context())
        client.ehlo()
        client.login(BOB, BOB_PW)
        assert client.mail(ALICE)[0] == 553
        assert client.mail(BOB)[0] == 250


def command(client: smtplib.SMTP, line: str) -> tuple[int, bytes]:
    client.putcmd(line)
    return client.getreply()


def test_auth_sequencing_and_exchange_errors(tls_server):
    server = tls_server(auth_failure_delay=0)
    with server.smtp(timeout=10) as client:
        assert command(client, "AUTH PLAIN")[0] == 503  # EHLO first
        client.ehlo()
        code, text = command(client, "AUTH PLAIN")
        assert (code, text[:6]) == (538, b"5.7.11")  # plaintext: TLS first
        client.starttls(context=server.certs.client_context())
        client.ehlo()
        assert command(client, "AUTH CRAM-MD5")[0] == 504  # flat_file keeps hashes: not offered
        assert command(client, "AUTH PLAIN")[0] == 334
        code, text = command(client, "*")
        assert (code, text[:5]) == (501, b"5.7.0")
        assert command(client, "AUTH LOGIN")[0] == 334
        code, text = command(client, "not base64!")
        assert (code, text[:5]) == (501, b"5.5.2")
        code, text = command(client, "AUTH PLAIN %%%")
        assert (code, text[:5]) == (501, b"5.5.2")
        assert client.mail(BOB)[0] == 250
        assert command(client, "AUTH PLAIN")[0] == 503  # inside a transaction
        client.rset()
        blob = base64.b64encode(f"\0{BOB}\0{BOB_PW}".encode()).decode()
        assert command(client, f"AUTH PLAIN {blob}")[0] == 235
        assert command(client, f"AUTH PLAIN {blob}")[0] == 503  # once only
        assert "auth" not in ehlo_keywords(client)


def test_auth_secrets_never_reach_the_log(tls_server, caplog):
    server = tls_server(auth_failure_delay=0)
    blob = base64.b64encode(f"\0{ALICE}\0{ALICE_PW}".encode()).decode()
    with caplog.at_level(logging.DEBUG):
        with server.smtp(timeout=10) as client:
            client.starttls(context=server.certs.client_context())
            client.ehlo()
            assert command(client, f"AUTH PLAIN {blob}=")[0] == 501  # refused lines are logged
            assert command(client, "AUTH LOGIN")[0] == 334
            assert command(client, base64.b64encode(ALICE.encode()).decode())[0] == 334
            assert command(client, base64.b64encode(b"wrong-pw").decode())[0] == 535
            assert command(client, f"AUTH PLAIN {blob}")[0] == 235
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "authenticated user=alice@example.test" in text
    for secret in (ALICE_PW, blob, "wrong-pw", base64.b64encode(b"wrong-pw").decode()):
        assert secret not in text


def test_brute_force_is_delayed_then_disconnected_and_others_unaffected(tls_server):
    server = tls_server(auth_failure_delay=0.05, auth_max_delay=0.5, auth_max_failures_ip=10,
                        auth_max_failures_user=50)
    context = server.certs.client_context()
    replies: list[tuple[int, float]] = []

    def attacker() -> None:
        with server.smtp(timeout=10) as client:
            client.starttls(context=context)
            client.ehlo()
            for attempt in range(20):
                blob = base64.b64encode(f"\0{ALICE}\0guess{attempt}".encode()).decode()
                started = time.monotonic()
                try:
                    code, _ = command(client, f"AUTH PLAIN {blob}")
                except smtplib.SMTPServerDisconnected:
                    break
                replies.append((code, time.monotonic() - started))
                if code == 421:
                    break

    attack = gevent.spawn(attacker)
    gevent.sleep(0.3)  # the attacker is in the tarpit now
    started = time.monotonic()
    with smtplib.SMTP(server.host, server.port, local_hostname="c.test", timeout=10,
                      source_address=("127.0.0.2", 0)) as other:  # another client address
        other.starttls(context=context)
        other.ehlo()
        assert other.login(BOB, BOB_PW)[0] == 235
    assert time.monotonic() - started < 1.0
    attack.get(timeout=30)
    codes = [code for code, _ in replies]
    assert codes[:9] == [535] * 9 and codes[-1] == 421 and len(codes) == 10, codes
    assert replies[8][1] > replies[0][1] + 0.2  # the delay grows
    with server.smtp(timeout=10) as again:  # the same address stays blocked for the window
        again.starttls(context=context)
        again.ehlo()
        assert command(again, "AUTH PLAIN")[0] == 421


def test_checkpassword_backend(make_server, tmp_path, certs):
    program = tmp_path / "checkpw"
    program.write_text(
        "#!/usr/bin/env python3\n"
        "import os, sys\n"
        "user, password, stamp = os.read(3, 1024).split(b'\\0')[:3]\n"
        "if (user, password) != (b'carol@example.test', b'open sesame'):\n"
        "    sys.exit(1)\n"
        "assert stamp.isdigit()\n"
        "os.execvp(sys.argv[1], sys.argv[1:])\n")
    program.chmod(0o755)
    certs.issue()
    server = make_server(f"""
[[auth/checkpassword]]
  command = {program}
[[rcpt_ok]]
  domains = example.test
[[queue/maildir]]
  path = Maildir
""", tls_certificate="server.pem", auth_failure_delay=0)
    with server.smtp(timeout=10) as client:
        client.starttls(context=certs.client_context())
        assert client.ehlo()[0] == 250
        assert client.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]  # no CRAM-MD5 unless asked
        with pytest.raises(smtplib.SMTPAuthenticationError):
            client.login("carol@example.test", "wrong")
        assert client.login("carol@example.test", "open sesame")[0] == 235


def test_smtps_listener_under_the_master_and_a_bad_certificate_is_a_config_error(server_process, tmp_path, certs):
    write_users(tmp_path)
    certs.issue()
    process = server_process(AUTH_PLUGINS, "--workers", "1", listen="127.0.0.1:0, 127.0.0.1:0/smtps",
                             tls_certificate="server.pem")
    with smtplib.SMTP_SSL("127.0.0.1", process.ports[1], local_hostname="c.test",
                          context=certs.client_context(), timeout=10) as client:
        client.login(ALICE, ALICE_PW)
        client.sendmail(ALICE, ["x@example.test"], b"Subject: 465\r\n\r\nx\r\n")
    with process.smtp(timeout=10) as plain:  # the first listener: plaintext, STARTTLS offered
        assert "starttls" in ehlo_keywords(plain)
    process.terminate()
    (tmp_path / "broken.pem").write_text("not a certificate\n")
    ini = tmp_path / "qpsmtpd.ini"
    ini.write_text(ini.read_text().replace("certificate = server.pem", "certificate = broken.pem"))
    result = subprocess.run([sys.executable, "-m", "qpgevent", "-c", str(ini)], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 2 and "[tls]: cannot load the certificates" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_bench_tls_tool_prints_numbers():
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_tls.py"), "--messages", "40",
                             "--concurrency", "2"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "STARTTLS msg/s" in result.stdout and len(result.stdout.splitlines()) == 3


def test_failures_are_also_counted_per_user_across_addresses(tls_server):
    server = tls_server(auth_failure_delay=0, auth_max_failures_ip=50, auth_max_failures_user=3)
    context = server.certs.client_context()

    def attempt(source: str, password: str) -> int:
        with smtplib.SMTP(server.host, server.port, local_hostname="c.test", timeout=10,
                          source_address=(source, 0)) as client:
            client.starttls(context=context)
            client.ehlo()
            blob = base64.b64encode(f"\0{ALICE}\0{password}".encode()).decode()
            return command(client, f"AUTH PLAIN {blob}")[0]

    assert [attempt(f"127.0.0.{n}", "guess") for n in (2, 3, 4)] == [535, 535, 421]
    assert attempt("127.0.0.5", ALICE_PW) == 421  # alice is locked for the window, from anywhere
    with smtplib.SMTP(server.host, server.port, local_hostname="c.test", timeout=10) as client:
        client.starttls(context=context)
        client.ehlo()
        assert client.login(BOB, BOB_PW)[0] == 235  # other users are not
