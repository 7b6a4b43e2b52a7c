"""tools/smtp_tls_source.c, the C benchmark client of tools/bench_tls_peers.py (--client c),
against the real server: it really does STARTTLS and delivers, verifies the certificate,
counts refusals and silent servers as failures."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
import trustme

from qpgevent.testing import maildir_messages

from tls_helpers import ROOT, Certs

sys.path.insert(0, str(ROOT / "tools"))
import bench_tls_peers  # noqa: E402


@pytest.fixture(scope="module")
def client_program(tmp_path_factory):
    return bench_tls_peers.build_c_client(tmp_path_factory.mktemp("smtp_tls_source"))


@pytest.fixture
def certs(tmp_path):
    certs = Certs(tmp_path)
    certs.issue()
    return certs


def run(program, port: int, cafile, connections: int, per_connection: int, concurrency: int,
        *idle: str) -> tuple[int, int, str]:
    result = subprocess.run([str(program), str(port), str(cafile), str(connections), str(per_connection),
                             str(concurrency), "2048", *idle], input="go\n", capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    ready, done = result.stdout.splitlines()
    assert ready == "ready"
    parsed = bench_tls_peers.parse_done(done)
    assert parsed is not None, done
    return parsed


def test_it_sends_every_message_inside_starttls(make_server, client_program, certs):
    server = make_server(tls_certificate="server.pem")
    assert run(client_program, server.port, certs.ca_path, 6, 3, 4) == (0, 18, "")
    messages = maildir_messages(server.maildir)
    assert len(messages) == 18
    for message in messages.values():
        assert b"with ESMTPS" in message.split(b"\r\n\r\n")[0]  # the server saw TLS
        assert message.count(b"x" * 76 + b"\r\n") == 2048 // 78  # the whole body arrived


def test_it_refuses_a_certificate_it_cannot_verify(make_server, client_program, certs, tmp_path):
    server = make_server(tls_certificate="server.pem")
    stranger = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(stranger))
    failures, messages, first = run(client_program, server.port, stranger, 2, 1, 2)
    assert (failures, messages) == (2, 0)
    assert first.startswith("handshake: TLS handshake failed") and "certificate verify failed" in first
    assert maildir_messages(server.maildir) == {}


def test_a_refused_recipient_fails_the_connection(make_server, client_program, certs):
    server = make_server("[[rcpt_ok]]\n  domains = elsewhere.test\n[[queue/maildir]]\n  path = Maildir\n",
                         tls_certificate="server.pem")
    failures, messages, first = run(client_program, server.port, certs.ca_path, 3, 2, 3)
    assert (failures, messages) == (3, 0)
    assert first.startswith("RCPT: 5")


def test_a_server_that_never_answers_fails_after_the_idle_limit(client_program, certs):
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts (the kernel does), never speaks
        failures, messages, first = run(client_program, silent.getsockname()[1], certs.ca_path, 2, 1, 2, "1")
    assert (failures, messages, first) == (2, 0, "greeting: no progress for 1 s")


@pytest.mark.parametrize("line, parsed", [
    ("done 0 2000 -\n", (0, 2000, "")),
    ("done 2 7 handshake: TLS handshake failed: x y\n", (2, 7, "handshake: TLS handshake failed: x y")),
    ("done 1 0 SMTPRecipientsRefused({...})", (1, 0, "SMTPRecipientsRefused({...})")),
    ("", None), ("ready\n", None), ("done 0 12\n", None), ("done x 1 -\n", None), ("Traceback ...\n", None),
])
def test_parse_done(line, parsed):
    assert bench_tls_peers.parse_done(line) == parsed
