"""auth/flat_file and auth/checkpassword through the real server (a /plainauth listener: no TLS)."""

from __future__ import annotations

import smtplib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "qpgevent-adduser"


def adduser(users: Path, user: str, password: str | None, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(TOOL), *flags, str(users), user],
                          input=None if password is None else password + "\n", text=True,
                          capture_output=True, timeout=30)


def login(server, user: str, password: str) -> int:
    with server.smtp(timeout=10) as client:
        client.ehlo()
        try:
            return client.login(user, password)[0]
        except smtplib.SMTPAuthenticationError as error:
            return error.smtp_code


@pytest.fixture
def flat_file_server(make_server, tmp_path):
    users = tmp_path / "users.auth"
    assert adduser(users, "dave@example.test", "first", "--stdin").returncode == 0
    server = make_server("[[auth/flat_file]]\n  users = users.auth\n[[rcpt_ok]]\n  domains = example.test\n",
                         listen="127.0.0.1:0/plainauth", auth_failure_delay=0)
    server.users = users
    return server


def test_users_file_holds_salted_scrypt_never_the_password(flat_file_server):
    text = flat_file_server.users.read_text()
    assert text.startswith("dave@example.test:scrypt$16384$8$1$") and "first" not in text
    assert adduser(flat_file_server.users, "erin@example.test", "first", "--stdin").returncode == 0
    hashes = [line.split(":", 1)[1] for line in flat_file_server.users.read_text().splitlines()]
    assert hashes[0] != hashes[1]  # same password, different salt


def test_password_change_and_removal_apply_without_restart(flat_file_server):
    server, users = flat_file_server, flat_file_server.users
    assert login(server, "dave@example.test", "first") == 235
    assert login(server, "DAVE@example.test", "first") == 235  # user names are case-insensitive
    assert adduser(users, "dave@example.test", "second", "--stdin").returncode == 0
    assert login(server, "dave@example.test", "first") == 535
    assert login(server, "dave@example.test", "second") == 235
    assert adduser(users, "dave@example.test", None, "--delete").returncode == 0
    assert login(server, "dave@example.test", "second") == 535
    assert adduser(users, "dave@example.test", None, "--delete").returncode == 1


def test_unknown_user_and_wrong_password_look_the_same(flat_file_server):
    with flat_file_server.smtp(timeout=10) as client:
        client.ehlo()
        assert client.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
        replies = []
        for user, password in (("nobody@example.test", "first"), ("dave@example.test", "wrong")):
            with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
                client.login(user, password)
            replies.append((refused.value.smtp_code, refused.value.smtp_error))
    assert replies[0] == replies[1] == (535, b"5.7.8 Authentication credentials invalid")


def test_checkpassword_timeout_and_crash_are_temporary(make_server, tmp_path):
    program = tmp_path / "slow"
    program.write_text("#!/bin/sh\nsleep 5\n")
    program.chmod(0o755)
    crash = tmp_path / "crash"
    crash.write_text("#!/bin/sh\nexit 111\n")
    crash.chmod(0o755)
    for command, timeout in ((program, "timeout = 0.5"), (crash, "")):
        server = make_server(f"[[auth/checkpassword]]\n  command = {command}\n  {timeout}\n",
                             listen="127.0.0.1:0/plainauth", auth_failure_delay=0)
        assert login(server, "x@example.test", "pw") == 454
        server.stop(0.5)


def test_cram_md5_end_to_end_through_checkpassword(make_server, tmp_path):
    """CRAM-MD5 (RFC 2195): the client proves it knows the secret without sending it.

    The checkpassword program knows the plaintext secret, as vchkpw does: it gets the
    client's digest in the password field and the challenge in the timestamp field.
    """
    program = tmp_path / "cram"
    program.write_text(
        f"#!{sys.executable}\n"
        "import hashlib, hmac, os\n"
        "user, digest, challenge = os.read(3, 4096).split(b'\\0')[:3]\n"
        "expected = hmac.new(b's3cret', challenge, hashlib.md5).hexdigest().encode()\n"
        "raise SystemExit(0 if user == b'dave@example.test' and hmac.compare_digest(digest, expected) else 1)\n")
    program.chmod(0o755)
    server = make_server(f"[[auth/checkpassword]]\n  command = {program}\n  cram_md5 = yes\n"
                         "[[rcpt_ok]]\n  domains = example.test\n",
                         listen="127.0.0.1:0/plainauth", auth_failure_delay=0)
    with server.smtp(timeout=10) as client:
        client.ehlo()
        assert "CRAM-MD5" in client.esmtp_features["auth"].split()
        def answer(secret):
            return lambda challenge=None: "dave@example.test " + _cram(secret, challenge)

        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            client.auth("CRAM-MD5", answer(b"wrong"), initial_response_ok=False)
        assert refused.value.smtp_code == 535
        assert client.auth("CRAM-MD5", answer(b"s3cret"), initial_response_ok=False)[0] == 235
        assert client.mail("dave@example.test")[0] == 250
        assert client.rcpt("someone@elsewhere.test")[0] == 250  # authenticated: may relay


def _cram(secret: bytes, challenge: bytes | None) -> str:
    import hashlib
    import hmac
    assert challenge, "CRAM-MD5 starts with a challenge"
    return hmac.new(secret, challenge, hashlib.md5).hexdigest()
