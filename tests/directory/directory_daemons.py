"""The real directory daemons on loopback for these tests: Dovecot's auth service, and slapd.

``LoopbackDovecot`` runs Debian's ``dovecot`` with no protocols (only its auth service),
users from a passwd-file, an ``auth-client`` and an ``auth-userdb`` unix listener and
an inet listener at a free port; ready when the handshake completes.
``LoopbackSlapd`` writes a private ``slapd.conf``, loads a small directory with
``slapadd`` (``dc=example,dc=test``, one ``inetOrgPerson`` per user under
``ou=people``), and runs ``slapd -d 0``; ready when the admin can bind.

Both can be stopped and started again on the same port (``stop``/``start``), and hung
(``pause``: SIGSTOP to the process group; the kernel still accepts connections, nobody
answers; ``resume``). Why they are configured so: ``shared/recipes/dovecot-sasl.md``
and ``slapd-ldap.md``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import ldap3

from qpgevent.core import dovecot_protocol
from qpgevent.testing.scanners import _Daemon, free_tcp_port

HOST = "127.0.0.1"
SUFFIX = "dc=example,dc=test"
ADMIN_DN, ADMIN_PW = f"cn=admin,{SUFFIX}", "admin-pw"

#: The tests' users: Dovecot's (user -> password), and the LDAP directory's (uid -> attributes).
DOVECOT_USERS = {"dana@example.test": "dana-pw", "eve@example.test": "eve-pw"}
PEOPLE = {
    "alice": {"mail": "alice@example.test", "userPassword": "alice-pw",
              "mailLocalAddress": ["a.example@example.test"]},
    "bob": {"mail": "bob@example.test", "userPassword": "bob-pw",
            "mailRoutingAddress": "bob@elsewhere.test"},
}

DOVECOT_CONF = """protocols =
base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
ssl = no
auth_mechanisms = {mechanisms}
disable_plaintext_auth = no
auth_failure_delay = 0
auth_debug = yes
passdb {{
  driver = {passdb}
  args = {passdb_args}
}}
userdb {{
  driver = passwd-file
  args = {d}/users
}}
service auth {{
  user = root
  unix_listener auth-client {{
    mode = 0666
  }}
  unix_listener auth-userdb {{
    mode = 0666
  }}
  inet_listener auth-tcp {{
    address = {host}
    port = {port}
  }}
}}
# Tests try wrong passwords on purpose: without this, the next AUTH from the same
# address waits 4 s, then 8 s... (Dovecot's auth penalty).
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
"""

SLAPD_CONF = f"""include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/inetorgperson.schema
include /etc/ldap/schema/nis.schema
include /etc/ldap/schema/misc.schema
{{tls}}pidfile {{d}}/slapd.pid
argsfile {{d}}/slapd.args
modulepath /usr/lib/ldap
moduleload back_mdb
database mdb
suffix "{SUFFIX}"
rootdn "{ADMIN_DN}"
rootpw {{rootpw}}
directory {{d}}/db
maxsize 16777216
index objectClass eq
index uid,mail,mailLocalAddress eq
access to attrs=userPassword by self write by anonymous auth by * none
access to * by * read
"""


class _Restartable(_Daemon):
    argv: list[str]

    def start(self) -> None:
        self._start(self.argv, self._ready, 30.0)

    def _first_start(self) -> None:
        """Start from the constructor: if it fails, nothing is left behind (no ``with`` yet)."""
        try:
            self.start()
        except BaseException:
            self.close()
            raise

    def _ready(self) -> bool:
        raise NotImplementedError

    def pause(self) -> None:
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGCONT)  # a paused daemon cannot act on SIGTERM
        super().stop()


class LoopbackDovecot(_Restartable):
    """Dovecot's auth service; ``users`` maps user -> password (stored {PLAIN}, for CRAM-MD5).

    ``broken_passdb``: the passdb is a checkpassword program that always exits 111 (its
    temporary failure), so every AUTH gets ``FAIL ... code=temp_fail``.
    """

    name = "dovecot"

    def __init__(self, users: dict[str, str], mechanisms: str = "plain login", broken_passdb: bool = False) -> None:
        super().__init__()
        self.workdir = tempfile.mkdtemp(prefix="qpg-dovecot-")
        for sub in ("run", "state"):
            os.mkdir(os.path.join(self.workdir, sub))
        # user:password:uid:gid:gecos:home: the uid/gid make it a userdb entry as well.
        Path(self.workdir, "users").write_text(
            "".join(f"{user}:{{PLAIN}}{password}:65534:65534::/nonexistent\n" for user, password in users.items()))
        self.port = free_tcp_port()
        passdb, passdb_args = "passwd-file", os.path.join(self.workdir, "users")
        if broken_passdb:
            passdb, passdb_args = "checkpassword", os.path.join(self.workdir, "tempfail")
            Path(passdb_args).write_text("#!/bin/sh\nexit 111\n")
            os.chmod(passdb_args, 0o755)
        conf = os.path.join(self.workdir, "dovecot.conf")
        Path(conf).write_text(DOVECOT_CONF.format(d=self.workdir, mechanisms=mechanisms, host=HOST, port=self.port,
                                                  passdb=passdb, passdb_args=passdb_args))
        self.argv = ["dovecot", "-F", "-c", conf]
        self.client_socket = os.path.join(self.workdir, "run", "auth-client")
        self.userdb_socket = os.path.join(self.workdir, "run", "auth-userdb")
        self.inet = f"{HOST}:{self.port}"
        self._first_start()

    def _ready(self) -> bool:
        import socket
        with socket.create_connection((HOST, self.port), timeout=1) as sock:
            sock.sendall(dovecot_protocol.client_hello(os.getpid()))
            handshake, data = dovecot_protocol.ClientHandshake(), b""
            for _ in range(50):  # bounded: a handshake is a few lines
                while b"\n" not in data:
                    chunk = sock.recv(4096)
                    if not chunk:
                        return False
                    data += chunk
                line, _, data = data.partition(b"\n")
                if handshake.feed(line):
                    return True
        return False

    def log(self) -> str:
        path = os.path.join(self.workdir, "dovecot.log")
        return Path(path).read_text(errors="replace")[-4000:] if os.path.exists(path) else super().log()


class LoopbackSlapd(_Restartable):
    """slapd with ``people``: uid -> attributes (``userPassword`` in clear, hashed here).

    With ``tls_ca`` (a ``trustme.CA``), slapd gets a certificate from it for the name
    localhost only, takes StartTLS on ``uri``, and listens for LDAPS on 127.0.0.1 too
    (``ldaps_uri`` names it localhost; by its address, the name does not match).
    """

    name = "slapd"

    def __init__(self, people: dict[str, dict[str, list[str] | str]], tls_ca: Any = None) -> None:
        super().__init__()
        self.workdir = tempfile.mkdtemp(prefix="qpg-slapd-")
        os.mkdir(os.path.join(self.workdir, "db"))
        conf = os.path.join(self.workdir, "slapd.conf")
        tls = ""
        if tls_ca is not None:
            issued = tls_ca.issue_cert("localhost")
            issued.cert_chain_pems[0].write_to_path(os.path.join(self.workdir, "cert.pem"))
            issued.private_key_pem.write_to_path(os.path.join(self.workdir, "key.pem"))
            tls = f"TLSCertificateFile {self.workdir}/cert.pem\nTLSCertificateKeyFile {self.workdir}/key.pem\n"
        Path(conf).write_text(SLAPD_CONF.format(d=self.workdir, rootpw=_ssha(ADMIN_PW), tls=tls))
        ldif = os.path.join(self.workdir, "data.ldif")
        Path(ldif).write_text(_ldif(people))
        try:
            subprocess.run(["slapadd", "-f", conf, "-l", ldif], check=True, capture_output=True, timeout=60)
        except BaseException:
            self.close()
            raise
        self.port = free_tcp_port()
        self.uri = f"ldap://{HOST}:{self.port}"
        listeners = self.uri + "/"
        if tls_ca is not None:
            ldaps_port = free_tcp_port()
            self.ldaps_uri = f"ldaps://localhost:{ldaps_port}"
            listeners += f" ldaps://{HOST}:{ldaps_port}/"
        self.argv = ["slapd", "-d", "0", "-h", listeners, "-f", conf]
        self._first_start()

    def _ready(self) -> bool:
        # A new Server per try: ldap3 marks a refused address unavailable for 5 s.
        server = ldap3.Server(HOST, port=self.port, get_info=ldap3.NONE, connect_timeout=1)
        try:
            connection = ldap3.Connection(server, ADMIN_DN, ADMIN_PW, receive_timeout=2)
            ready = connection.bind()
            connection.unbind()
            return bool(ready)
        except ldap3.core.exceptions.LDAPException:
            return False


def _ssha(password: str) -> str:
    return subprocess.run(["slappasswd", "-s", password], check=True, capture_output=True, text=True,
                          timeout=30).stdout.strip()


def _ldif(people: dict[str, dict[str, list[str] | str]]) -> str:
    blocks = [f"dn: {SUFFIX}\nobjectClass: top\nobjectClass: dcObject\nobjectClass: organization\n"
              "o: Example Test\ndc: example\n",
              f"dn: ou=people,{SUFFIX}\nobjectClass: organizationalUnit\nou: people\n"]
    for uid, attributes in people.items():
        lines = [f"dn: uid={uid},ou=people,{SUFFIX}", "objectClass: inetOrgPerson",
                 "objectClass: inetLocalMailRecipient", f"uid: {uid}", f"cn: {uid}", f"sn: {uid}"]
        for name, values in attributes.items():
            for value in [values] if isinstance(values, str) else values:
                lines.append(f"{name}: {_ssha(value) if name == 'userPassword' else value}")
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)
