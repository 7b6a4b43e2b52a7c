"""TLS material and AUTH users for the STARTTLS/SMTPS/AUTH tests (trustme: a CA in memory)."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
from pathlib import Path

import trustme

ROOT = Path(__file__).resolve().parents[2]
NAMES = ("mx.example.test", "localhost", "127.0.0.1")
USERS = {"alice@example.test": "alice-s3cret", "bob@example.test": "bob-pa55"}

AUTH_PLUGINS = """
[[auth/flat_file]]
  users = users.auth
[[rcpt_ok]]
  domains = example.test
[[queue/maildir]]
  path = Maildir
"""


class Certs:
    """A throwaway CA, and server certificates written as PEM files in ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ca = trustme.CA()
        self.ca_path = directory / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_path))

    def issue(self, name: str = "server.pem", *names: str) -> Path:
        """Write key + chain for ``names`` to ``name`` atomically (as a renewal tool does)."""
        cert = self.ca.issue_cert(*(names or NAMES))
        path = self.directory / name
        temporary = path.with_suffix(".new")
        cert.private_key_and_cert_chain_pem.write_to_path(str(temporary))
        os.replace(temporary, path)
        return path

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_path))


def write_users(directory: Path, users: dict[str, str] = USERS) -> Path:
    """The users file, made with the real tool (tools/qpgevent-adduser)."""
    path = directory / "users.auth"
    for user, password in users.items():
        subprocess.run([sys.executable, str(ROOT / "tools" / "qpgevent-adduser"), "--stdin", str(path), user],
                       input=password + "\n", text=True, check=True, capture_output=True, timeout=30)
    return path


def peer_serial(tls_sock: ssl.SSLSocket) -> int:
    der = tls_sock.getpeercert(binary_form=True)
    from cryptography import x509
    return x509.load_der_x509_certificate(der).serial_number
